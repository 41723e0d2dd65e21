"""bench/policy_baselines.py and the baseline policies it trains: the table's rows end to end at a toy
budget, the privileged observations the MLP acts on, the colour words the CNN is conditioned on,
and the random base of the shipped base's shape."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vla_peft.policy.baselines import COLOUR_WORDS, colour_ids
from vla_peft.pretrain.base import SHIPPED

BENCH = Path(__file__).resolve().parent.parent / "bench" / "policy_baselines.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("policy_baselines", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_colour_ids_read_the_object_then_the_goal():
    none = len(COLOUR_WORDS)
    ids = colour_ids(["push the red cube onto the blue pad", "reach the yellow cube", "move"])
    assert ids.tolist() == [[COLOUR_WORDS.index("red"), COLOUR_WORDS.index("blue")],
                            [COLOUR_WORDS.index("yellow"), none], [none, none]]


def test_privileged_observations_are_the_true_positions():
    bench = load_bench()
    import gymnasium as gym

    env = gym.make(bench.privileged_env_id("Push"), image_size=32, cameras=("agentview",))
    try:
        obs, _ = env.reset(seed=3)
        for _ in range(2):
            obs, *_ = env.step(np.array([1.0, 0.0, -1.0, -1.0], np.float32))
        base = env.unwrapped
        np.testing.assert_allclose(obs["target_pos"], base.cube_pos(0), atol=1e-6)
        np.testing.assert_allclose(obs["goal_pos"], base.pad_pos(0), atol=1e-6)
        assert env.observation_space.contains(obs)
        assert env.spec.max_episode_steps == 120
    finally:
        env.close()


def test_random_base_has_the_shipped_shape_and_inputs_but_not_its_weights(tmp_path):
    bench = load_bench()
    out = bench.save_random_base(SHIPPED, tmp_path / "random")
    shipped, random = load_file(SHIPPED / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in shipped.items()} == {k: v.shape for k, v in random.items()}
    assert not any(torch.equal(shipped[k], random[k]) for k in shipped if shipped[k].ndim == 2)
    assert (out / "image_norm.safetensors").read_bytes() == (SHIPPED / "image_norm.safetensors").read_bytes()
    assert (out / "tokenizer.json").is_file() and not (out / "pretrain_recipe.json").exists()


@pytest.mark.slow
def test_bench_prints_one_row_per_policy_at_a_toy_budget(tmp_path, capsys):
    bench = load_bench()
    rows = bench.main(["--task", "Push", "--num-demos", "3", "--minutes", "0.02", "--episodes", "2",
                       "--base", "random", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "collecting: vla-peft collect --task Push --episodes 3" in printed  # the file was missing
    assert [r["row"] for r in rows] == ["MLP, privileged state", "CNN, from scratch", "LoRA, random base"]
    lines = printed.splitlines()
    table = lines[max(i for i, line in enumerate(lines) if line.startswith("row ")):]
    assert [line.split(",")[0] for line in table[2:5]] == ["MLP", "CNN", "LoRA"] and table[5].startswith("(2 closed")
    for row in rows:
        assert row["episodes"] == 2 and row["steps"] >= 1 and row["chunk_ms"] > 0
        assert 0 <= row["ci95"][0] <= row["success_rate"] <= row["ci95"][1] <= 1
    assert rows[0]["trainable"] < rows[1]["trainable"] < rows[2]["trainable"]
