"""`vla-peft bench query_probe` on a tiny trained run: its own-head row is the run's validation L1,
and every fresh head gets a finite score."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from policy_synth import write_demos
from vla_peft.train import load_run_config, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_query_probe_scores_the_bundles_head_as_training_did(tiny_llava_dir, tmp_path):
    demos = write_demos(tmp_path / "synth.hdf5", episodes=10)
    out = tmp_path / "run"
    train(load_run_config({
        "policy": {"base": str(tiny_llava_dir), "chunk_size": 4, "head_width": 64},
        "method": {"method": "lora", "r": 4, "targets": {"language": [r"layers\.\d+\.self_attn\.(q|v)_proj"]}},
        "data": {"paths": [str(demos)], "val_fraction": 0.2, "augment": True},
        "train": {"output_dir": str(out), "steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 4,
                  "save_every": 100, "log_every": 1},
    }), progress=False)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "query_probe.py"), "--run", str(out), "--steps", "5"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line[:34].strip(): float(line[34:]) for line in result.stdout.splitlines()[2:]}
    assert list(rows) == ["the bundle's own head", "the training chunks' median", "fresh head on queries",
                          "fresh head on queries + state", "fresh head on state"]
    validation = json.loads((out / "summary.json").read_text())["validation"]["val_l1"]
    assert rows["the bundle's own head"] == pytest.approx(validation, rel=0.02)
    assert all(0 < value < 10 for value in rows.values())
