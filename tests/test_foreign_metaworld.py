"""The Meta-World preset: distinct scenes per seed, cheap frames, scripted-expert collection and
``vla-peft eval --env metaworld/reach-v3`` with no key map. Runs where the metaworld extra is
installed (it pins mujoco == 3.3.0: a virtualenv of its own), skips elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="needs the metaworld extra: pip install -e '.[metaworld]' in its own venv")

import gymnasium as gym  # noqa: E402

import envs  # noqa: E402,F401  (registers the wrappers)
from envs.presets import resolve_preset  # noqa: E402
from eval_synth import one_torch_thread  # noqa: E402
from vla_peft.cli import main  # noqa: E402

one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


def make(task="reach-v3", **kwargs):
    preset = resolve_preset(f"metaworld/{task}")
    return gym.make(preset.env_id, **{**preset.kwargs, "image_size": 32, **kwargs})


def test_fifty_seeds_are_fifty_distinct_scenes_and_a_seed_repeats_its_scene():
    """MT1 built with a fixed seed gave pairs of identical episodes; the preset's reset(seed) draws
    the scene from the seed: 50 seeds, 50 goals, and seed 1000 again is the same scene."""
    env = make()
    try:
        goals = []
        for seed in range(1000, 1050):
            env.reset(seed=seed)
            goals.append(tuple(np.round(env.unwrapped.task_positions()["goal_pos"], 5)))
        assert len(set(goals)) == 50
        obs, _ = env.reset(seed=1000)
        assert tuple(np.round(env.unwrapped.task_positions()["goal_pos"], 5)) == goals[0]
        again, _ = env.reset(seed=1000)
        np.testing.assert_array_equal(obs["corner_rgb"], again["corner_rgb"])
    finally:
        env.close()


def test_preset_renders_without_the_4096_pixel_shadow_maps():
    """Meta-World's scene asks for 4096-pixel shadows and 4x multisampling (0.33 s a 64x64 frame here)."""
    env = make()
    try:
        quality = env.unwrapped._env.model.vis.quality
        assert quality.shadowsize <= 512 and quality.offsamples == 0
        obs, info = env.reset(seed=0)
        assert obs["corner_rgb"].shape == (32, 32, 3) and obs["corner_rgb"].std() > 10  # a picture, not a blank
        assert obs["ee_pos"].shape == (3,) and obs["gripper_states"].shape == (1,)
        assert info["instruction"] == "reach the goal position"
    finally:
        env.close()


@pytest.mark.slow
def test_collect_records_the_scripted_policy_and_its_demos_replay(tmp_path):
    from vla_peft.data.collect import replay
    from vla_peft.data.hdf5 import DemoFile

    out = tmp_path / "reach.hdf5"
    assert main(["collect", "--env", "metaworld/reach-v3", "--episodes", "2", "--image-size", "32",
                 "--out", str(out)]) == 0
    with DemoFile(out) as demos:
        assert demos.env_args["env_name"] == "metaworld/reach-v3" and demos.env_args["camera_names"] == ["corner"]
        episode = demos.episode("demo_0")
        assert episode.attrs["success"] and episode.instruction == "reach the goal position"
        assert episode.obs["corner_rgb"].shape[1:] == (32, 32, 3) and episode.actions.shape[1] == 4
        assert {"ee_pos", "gripper_states", "goal_pos", "object_pos"} <= set(episode.obs)
    again = replay(out, "demo_1")
    assert again["success"] and again["ee_pos_gap"] < 1e-5


@pytest.fixture(scope="module")
def corner_bundle(tiny_llava_dir, tmp_path_factory):
    """A policy on Meta-World's ``corner`` camera and its 4-dim state, saved as a bundle."""
    import torch

    from eval_synth import LORA_TARGETS, normalizers
    from vla_peft.models import load_vlm
    from vla_peft.peft import LoraConfig
    from vla_peft.policy import PolicyConfig, VLAPolicy
    from vla_peft.policy.bundle import save_bundle

    vlm, processor = load_vlm(tiny_llava_dir)
    config = PolicyConfig(base=str(tiny_llava_dir), cameras=["corner"], image_size=32, state_dim=4, chunk_size=4,
                          execute_steps=2, head_width=64)
    torch.manual_seed(0)
    policy = VLAPolicy(config, vlm, processor, LoraConfig(r=4, alpha=8, targets=LORA_TARGETS))
    policy.normalizers = normalizers(4, 4)
    return save_bundle(policy.eval(), tmp_path_factory.mktemp("mw_bank") / "mw_reach" / "bundle")


@pytest.mark.slow
def test_eval_with_the_preset_needs_no_key_map(corner_bundle, tmp_path):
    """Every episode starts from its own seed, with the instruction and success flag the preset brings."""
    argv = ["eval", "--bundle", str(corner_bundle), "--env", "metaworld/reach-v3", "--episodes", "3", "--num-envs", "2",
            "--max-steps", "4", "--out", str(tmp_path / "eval"), "--no-progress"]
    assert main(argv) == 0
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    summary = info["results"]["per_task"]["metaworld/reach-v3"]
    assert summary["preset"] == "metaworld/reach-v3" and summary["env_id"] == "vla_peft/MetaWorld-v0"
    rows = info["results"]["per_episode"]
    assert [r["seed"] for r in rows] == [1000, 1001, 1002]
    assert all(r["error"] is None and r["length"] == 4 and r["instruction"] == "reach the goal position" for r in rows)
    assert len({r["return"] for r in rows}) == 3  # three scenes, three different rewards
    assert info["timing"]["metaworld/reach-v3"]["control_hz_target"] == 80.0


@pytest.mark.slow
def test_served_policy_runs_the_preset_on_the_client_side(corner_bundle, tmp_path):
    """A serve client evaluates the preset by name; every chunk comes from the server, and the
    results equal the in-process evaluation of the same bundle."""
    from serve_synth import threaded_server
    from vla_peft.eval import EvalConfig, evaluate
    from vla_peft.policy.bundle import load_bundle
    from vla_peft.serve.client import PolicyClient
    from vla_peft.serve.remote_eval import evaluate_remote
    from vla_peft.serve.server import load_bank

    config = dict(episodes=2, max_steps=4, progress=False)
    with threaded_server(load_bank(corner_bundle.parent.parent)) as url:
        remote = evaluate_remote(PolicyClient(url), {"metaworld/reach-v3": "mw_reach"},
                                 EvalConfig(**config, out=str(tmp_path / "remote")))
    local = evaluate(["metaworld/reach-v3"], lambda _: load_bundle(corner_bundle),
                     EvalConfig(**config, out=str(tmp_path / "local")))
    assert remote["results"]["per_task"]["metaworld/reach-v3"]["preset"] == "metaworld/reach-v3"
    strip = [{k: v for k, v in r.items() if k != "return"} for r in local["results"]["per_episode"]]
    assert [{k: v for k, v in r.items() if k != "return"} for r in remote["results"]["per_episode"]] == strip
    for got, want in zip(remote["results"]["per_episode"], local["results"]["per_episode"]):
        assert got["return"] == pytest.approx(want["return"], abs=1e-4)
