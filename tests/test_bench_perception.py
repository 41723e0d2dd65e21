"""`vla-peft bench perception` end to end at a toy size: it renders expert frames, probes a base and prints its rows."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_perception_bench_prints_a_row_per_base_reader_and_camera():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "perception.py"), "--bases", "shipped", "random", "--episodes", "2",
         "--posed", "16", "--steps", "5", "--cameras", "agentview", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "MUJOCO_GL": "egl", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("shipped", "random", "(predict"))]
    assert [r[:3] for r in rows] == [["(predict", "the", "mean)"], ["shipped", "image", "agentview"], ["shipped", "prompt", "agentview"],
                                     ["random", "image", "agentview"], ["random", "prompt", "agentview"]]
    for r in rows:  # every cell a finite error in cm: tasks, all cubes, pads, lifted, at fingers, free
        assert len(r) in (12, 14) and all(0 < float(c) < 100 for c in r[-9:])


@pytest.mark.slow
def test_perception_bench_reads_both_cameras_side_by_side():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "perception.py"), "--bases", "shipped", "--episodes", "2",
         "--posed", "16", "--steps", "5", "--cameras", "both", "--readers", "image", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "MUJOCO_GL": "egl", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("shipped")]
    assert [r[:3] for r in rows] == [["shipped", "image", "both"]]
    assert all(0 < float(c) < 100 for c in rows[0][-9:])
