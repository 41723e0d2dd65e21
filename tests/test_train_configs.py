"""Every task has its own run config in configs/train/, and it trains what the demo trains for that task."""

import dataclasses
from pathlib import Path

import pytest

from vla_peft.demo import DemoConfig, prepare_task, split_overrides
from vla_peft.train.config import load_run_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("task", ["Push", "PickPlace"])
def test_task_train_config_matches_the_demo_settings(task, tmp_path):
    """configs/train/<task>_lora.yaml loads through the real loader and equals the demo's run for the task,
    apart from the paths the demo chooses itself (base, data file, output folder)."""
    config = load_run_config(REPO / "configs" / "train" / f"{task.lower()}_lora.yaml")
    own, run_overrides = split_overrides([])
    collect, play, demo = prepare_task(task, DemoConfig(tasks=[task]), "", tmp_path, own, run_overrides)
    assert config.method.to_dict() == demo.method.to_dict()
    assert {**config.policy.to_dict(), "base": ""} == demo.policy.to_dict()
    assert {**config.data, "paths": None, "grounding_paths": None} == {**demo.data, "paths": None, "grounding_paths": None}
    assert [Path(p).as_posix() for p in config.data["grounding_paths"]][0].endswith(f"demos/{task.lower()}_play.hdf5")
    header = (REPO / "configs" / "train" / f"{task.lower()}_lora.yaml").read_text()  # the commands that make its data
    assert f"--episodes {collect.episodes} --out demos/{task.lower()}.hdf5" in header and f"--seed {collect.seed}" in header
    assert f"--play --episodes {play.episodes} --max-steps {play.max_steps} --out demos/{task.lower()}_play.hdf5" in header
    assert f"--seed {play.seed}" in header
    assert dataclasses.replace(config.train, output_dir="x") == dataclasses.replace(demo.train, output_dir="x")
    assert [Path(p).as_posix() for p in config.data["paths"]][0].endswith(f"demos/{task.lower()}.hdf5")
    assert Path(config.policy.base).resolve() == REPO / "vla_peft" / "pretrain" / "base"  # resolved wherever it runs from


def test_every_demo_task_has_a_train_config():
    tasks = sorted(p.stem for p in (REPO / "configs" / "tasks").glob("*.yaml"))
    assert tasks == ["pickplace", "push", "reach"]
    for task in tasks:
        load_run_config(REPO / "configs" / "train" / f"{task}_lora.yaml")
