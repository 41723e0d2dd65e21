"""kill -9 at chosen and at random moments: training resumed after each crash ends in the bundle of an
uninterrupted run, bit for bit, with augmentation and dropout on; a killed `collect` rerun gives a
complete file and leaves no temporary one behind."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policy_synth import write_demos
from test_train_resume import bundle_bytes
from vla_peft.data import DemoFile
from vla_peft.train import load_run_config, train
from vla_peft.train.checkpoint import list_checkpoints

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# (where, n): die at the n-th call there. In order, on one run directory (8 steps, a checkpoint every 2):
CRASHES = [
    ("optimizer_step", 2),     # before the first checkpoint: the rerun starts afresh
    ("checkpoint_file", 5),    # inside step 4's checkpoint (its optimiser file): step 2 is the newest complete one
    ("checkpoint_prune", 3),   # step 6's checkpoint renamed into place, step 2's not yet pruned
    ("metrics_line", 1),       # the first metrics line after resuming from step 6
    ("bundle_file", 1),        # inside the bundle write, after the last checkpoint
]


def write_config(path: Path, base, demos, out) -> Path:
    path.write_text(f"""
policy: {{base: {base}, chunk_size: 4, head_width: 64}}
method: {{method: lora, r: 4, dropout: 0.1, targets: {{language: ['layers\\.\\d+\\.self_attn\\.(q|v)_proj']}}}}
data: {{paths: [{demos}], val_fraction: 0.2, augment: true}}
train: {{output_dir: {out}, steps: 8, batch_size: 4, warmup_steps: 1, lr: 1e-3, eval_every: 4, save_every: 2,
        keep_last: 2, log_every: 1, threads: 1}}
""")
    return path


def train_command(config: Path, out: Path, crash: tuple[str, int] | None = None) -> list[str]:
    """Resume when a complete checkpoint exists (what a person would do after a crash), else start afresh."""
    resume = ["--resume"] if list_checkpoints(out) else []
    head = [sys.executable, str(TESTS / "kill_at.py"), *map(str, crash)] if crash else [sys.executable, "-m", "vla_peft.cli"]
    return [*head, "train", "--config", str(config), *resume]


@pytest.mark.slow
def test_training_killed_anywhere_then_resumed_gives_the_uninterrupted_bundle_bitwise(tiny_llava_dir, tmp_path):
    demos = write_demos(tmp_path / "synth.hdf5")
    straight = tmp_path / "straight"
    train(load_run_config(write_config(tmp_path / "straight.yaml", tiny_llava_dir, demos, straight)), progress=False)

    out = tmp_path / "crashed"
    config = write_config(tmp_path / "crashed.yaml", tiny_llava_dir, demos, out)
    for crash in CRASHES:
        run = subprocess.run(train_command(config, out, crash), env=ENV, capture_output=True, text=True, timeout=300)
        assert run.returncode == -signal.SIGKILL, (crash, run.stderr[-2000:])
    rng = random.Random(0)  # and once at a random moment, from outside
    delay = rng.uniform(5, 15)
    child = subprocess.Popen(train_command(config, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    final = subprocess.run(train_command(config, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert bundle_bytes(out) == bundle_bytes(straight)
    assert not list((out / "checkpoints").glob("*.partial"))


@pytest.mark.slow
def test_collect_killed_then_rerun_gives_a_complete_file(tmp_path):
    out = tmp_path / "reach.hdf5"
    command = [sys.executable, "-m", "vla_peft.cli", "collect", "--task", "Reach", "--episodes", "5", "--out", str(out),
               "--image-size", "16", "--cameras", "agentview"]
    child = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / f".reach.hdf5.partial-{child.pid}"
    deadline = time.monotonic() + 120
    while not partial.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    assert partial.exists(), "collect never started writing"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert partial.exists() and not out.exists()

    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"removed {partial}, left by a killed write" in rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reach.hdf5", "reach.json"]
    with DemoFile(out) as f:
        assert len(f.demos) == 5
