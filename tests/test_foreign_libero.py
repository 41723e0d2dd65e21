"""The LIBERO preset: the task's language and cameras under our names, LIBERO's 50 initial states
as 50 seeds, and ``vla-peft eval --env libero/libero_spatial/0`` with no key map. Runs where the
libero extra is installed (hf-libero pins mujoco < 3.9: a virtualenv of its own), skips elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="needs the libero extra: pip install -e '.[libero]' in its own venv")

import gymnasium as gym  # noqa: E402

import envs  # noqa: E402,F401  (registers the wrappers)
from envs.presets import resolve_preset  # noqa: E402
from vla_peft.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def env():
    from envs.presets import MissingExtraError

    preset = resolve_preset("libero/libero_spatial/0")
    try:
        env = gym.make(preset.env_id, **preset.kwargs, image_size=32, cameras=("agentview", "wrist"))
    except MissingExtraError as err:  # installed, but its scene assets could not be downloaded
        pytest.skip(str(err))
    yield env
    env.close()


def test_observations_use_our_names_and_the_tasks_language(env):
    obs, info = env.reset(seed=1000)
    assert obs["agentview_rgb"].shape == (32, 32, 3) and obs["wrist_rgb"].shape == (32, 32, 3)
    assert obs["ee_pos"].shape == (3,) and obs["gripper_states"].shape == (2,) and obs["joint_states"].shape == (7,)
    assert "bowl" in info["instruction"] and info["init_state"] == 0
    obs, reward, terminated, truncated, info = env.step(np.zeros(7, np.float32))
    assert info["is_success"] in (True, False) and not truncated


def test_fifty_seeds_are_the_fifty_initial_states(env):
    starts = set()
    for seed in range(1000, 1050):
        obs, info = env.reset(seed=seed)
        starts.add(info["init_state"])
    assert starts == set(range(50))


@pytest.mark.slow
def test_eval_with_the_preset_needs_no_key_map(env, tiny_llava_dir, tmp_path):
    import torch

    from eval_synth import LORA_TARGETS, normalizers
    from vla_peft.models import load_vlm
    from vla_peft.peft import LoraConfig
    from vla_peft.policy import PolicyConfig, VLAPolicy
    from vla_peft.policy.bundle import save_bundle

    vlm, processor = load_vlm(tiny_llava_dir)
    config = PolicyConfig(base=str(tiny_llava_dir), cameras=["agentview", "wrist"], image_size=32, state_dim=5,
                          action_dim=7, chunk_size=4, execute_steps=2, head_width=64)
    torch.manual_seed(0)
    policy = VLAPolicy(config, vlm, processor, LoraConfig(r=4, alpha=8, targets=LORA_TARGETS))
    policy.normalizers = normalizers(7, 5)
    bundle = save_bundle(policy.eval(), tmp_path / "bundle")
    argv = ["eval", "--bundle", str(bundle), "--env", "libero/libero_spatial/0", "--episodes", "2",
            "--max-steps", "4", "--out", str(tmp_path / "eval"), "--no-progress"]
    assert main(argv) == 0
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    rows = info["results"]["per_episode"]
    assert all(r["error"] is None and r["length"] == 4 and "bowl" in r["instruction"] for r in rows)
