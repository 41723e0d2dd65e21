"""`vla-peft demo --quick` end to end: every stage runs and leaves what the README promises."""

from __future__ import annotations

import json

import pytest

from vla_peft.cli import main

TASKS = ["Reach", "Push", "PickPlace"]


@pytest.mark.slow
def test_quick_demo_end_to_end(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    # The random tiny base stands in for the pretrained one: this checks the machinery, not success.
    assert main(["demo", "--quick", "--base", str(tiny_llava_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    summary = json.loads((out / "demo_summary.json").read_text())
    assert [row["task"] for row in summary["rows"]] == TASKS
    assert summary["quick"] and summary["swap"].startswith("AdapterBank")
    info = json.loads((out / "eval_info.json").read_text())
    assert list(info["results"]["per_task"]) == TASKS
    for row in summary["rows"]:
        task = row["task"]
        assert row["method"] == "lora" and 0 < row["trainable_percent"] < 100
        assert row["trainable_parameters"] < row["total_parameters"]
        assert row["demos"] == row["play_scenes"] == 4 and row["train_steps"] == 4 and row["train_s"] > 0
        # configs/tasks/*.yaml: eval_crop_grid 4 for Reach, 2 for Push and PickPlace
        assert row["test_crops"] == {"Reach": 16, "Push": 4, "PickPlace": 4}[task]
        per_task = info["results"]["per_task"][task]
        assert row["episodes"] == per_task["episodes"] == 2
        assert row["success_rate"] == per_task["success_rate"] and row["ci95"] == per_task["ci95"]
        assert row["action_latency_ms_p50"] > 0
        assert (out / "data" / f"{task}.hdf5").is_file() and (out / "data" / f"{task}_play.hdf5").is_file()
        assert (out / "train" / task / "loss_curve.png").stat().st_size > 0
        assert (out / "train" / task / "bundle" / "bundle.json").is_file()
        assert (out / "videos" / f"{task}_ep000.mp4").stat().st_size > 0
        # The printed table has the task's row with its figures.
        line = next(line for line in printed.splitlines() if line.startswith(task + " "))
        assert f"{row['trainable_percent']:.2f}%" in line and f"{100 * row['success_rate']:.1f}%" in line
    assert str(out) in printed.splitlines()[-3]  # the folder is named at the end
    # A second run into the same folder is refused rather than mixed with the first.
    assert main(["demo", "--quick", "--base", str(tiny_llava_dir), "--out", str(out)]) == 2
