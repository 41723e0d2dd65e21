"""--resume: exact with augmentation on, past an unreadable newest checkpoint, and refused when the
config would not continue the run."""

import json
from pathlib import Path

import pytest

from policy_synth import write_demos
from vla_peft.train import load_run_config, train
from vla_peft.train.checkpoint import list_checkpoints

LORA = {"method": "lora", "r": 4, "dropout": 0.1,  # dropout: the model draws from the global RNG too
        "targets": {"language": [r"layers\.\d+\.self_attn\.(q|v)_proj"]}}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_demos(tmp_path_factory.mktemp("resume_demos") / "synth.hdf5")


def run_config(base, demos, out, method=LORA, **train_overrides):
    return load_run_config({
        "policy": {"base": str(base), "chunk_size": 4, "head_width": 64},
        "method": method,
        "data": {"paths": [str(demos)], "val_fraction": 0.2, "augment": True},
        "train": {"output_dir": str(out), "steps": 6, "batch_size": 4, "warmup_steps": 1, "lr": 1e-3,
                  "eval_every": 100, "save_every": 3, "keep_last": 3, "log_every": 1, **train_overrides},
    })


def bundle_bytes(out: Path) -> dict[str, bytes]:
    """Every file of the bundle, bundle.json without its wall-clock time."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "bundle").rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("bundle/bundle.json"))
    manifest["training"].pop("elapsed_s")
    return {**files, "bundle.json": json.dumps(manifest, sort_keys=True).encode()}


def crash_after_first_checkpoint(monkeypatch):
    """Stop training (as Ctrl-C would) right after the step-3 checkpoint is written."""
    import vla_peft.train.loop as loop

    real = loop.save_checkpoint
    def save_then_stop(*args, **kwargs):
        path = real(*args, **kwargs)
        raise KeyboardInterrupt("stopped after " + path.name)
    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    return lambda: monkeypatch.setattr(loop, "save_checkpoint", real)


@pytest.fixture(scope="module")
def straight(tiny_llava_dir, demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(run_config(tiny_llava_dir, demos, out), progress=False)
    return out


@pytest.fixture
def stopped_at_3(tiny_llava_dir, demos, tmp_path, monkeypatch):
    undo = crash_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(tiny_llava_dir, demos, tmp_path / "run"), progress=False)
    undo()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000003"]
    return tmp_path / "run"


def test_resume_with_augmentation_gives_the_uninterrupted_bundle_bitwise(tiny_llava_dir, demos, straight, stopped_at_3):
    train(run_config(tiny_llava_dir, demos, stopped_at_3), resume=True, progress=False)
    assert bundle_bytes(stopped_at_3) == bundle_bytes(straight)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tiny_llava_dir, demos, straight, stopped_at_3,
                                                                    capsys):
    import shutil

    checkpoints = stopped_at_3 / "checkpoints"
    newest = checkpoints / "step_0000005"  # complete-looking, but its weights were cut short (a full disk, a bad copy)
    shutil.copytree(checkpoints / "step_0000003", newest)
    weights = newest / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    train(run_config(tiny_llava_dir, demos, stopped_at_3), resume=True, progress=False)
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "step_0000005 is unreadable" in err and "trying step_0000003" in err
    assert bundle_bytes(stopped_at_3) == bundle_bytes(straight)


def test_resume_with_no_readable_checkpoint_says_so(tiny_llava_dir, demos, stopped_at_3):
    weights = stopped_at_3 / "checkpoints" / "step_0000003" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="no checkpoint under .* can be read"):
        train(run_config(tiny_llava_dir, demos, stopped_at_3), resume=True, progress=False)


@pytest.mark.parametrize("override, named", [
    ({"seed": 1}, r"train\.seed \(0 -> 1\)"),
    ({"lr": 2e-3}, r"train\.lr \(0\.001 -> 0\.002\)"),
    ({"method": {**LORA, "r": 8}}, r"method\.r \(4 -> 8\)"),
    ({"steps": 2}, r"train\.steps=2 is below the checkpoint's step 3"),
])
def test_resume_with_a_changed_setting_is_refused_naming_it(tiny_llava_dir, demos, stopped_at_3, override, named):
    method = override.pop("method", LORA)
    with pytest.raises(ValueError, match=named):
        train(run_config(tiny_llava_dir, demos, stopped_at_3, method=method, **override), resume=True, progress=False)
    assert [p.name for p in list_checkpoints(stopped_at_3)] == ["step_0000003"]


def test_resume_may_raise_steps_and_change_bookkeeping(tiny_llava_dir, demos, stopped_at_3):
    result = train(run_config(tiny_llava_dir, demos, stopped_at_3, steps=7, log_every=2, keep_last=1),
                   resume=True, progress=False)
    assert result.summary["resumed_from"] == 3 and result.summary["steps"] == 7


def test_augmentation_follows_the_sampler_not_the_global_rng_or_the_workers(demos):
    """The crops of global batch s are the same from step 0 or resumed at s, in the main process or in
    DataLoader workers, whatever torch's global RNG holds."""
    import torch
    from torch.utils.data import DataLoader

    from vla_peft.data import DataConfig, DemoDataset
    from vla_peft.train.sampler import StepBatchSampler

    dataset = DemoDataset(DataConfig(paths=[str(demos)], augment=True, crop_scale=0.64))

    def images(start, workers, global_seed):
        torch.manual_seed(global_seed)
        sampler = StepBatchSampler(len(dataset), 4, seed=0, start_step=start, total_steps=4)
        return [b["images"] for b in DataLoader(dataset, batch_sampler=sampler, num_workers=workers)][-1]

    reference = images(0, 0, 0)
    for start, workers, global_seed in [(3, 0, 1), (2, 2, 2)]:
        assert torch.equal(images(start, workers, global_seed), reference)
    assert not torch.equal(dataset[(0, 1)]["images"], dataset[(0, 2)]["images"])  # the draw seed does draw


def test_runs_are_written_and_resumed_without_pickle(tiny_llava_dir, demos, stopped_at_3, monkeypatch):
    """Checkpoints, bundle and logs are safetensors, JSON and a PNG; resuming never unpickles."""
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during resume")
    for owner, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(owner, name, refuse)
    train(run_config(tiny_llava_dir, demos, stopped_at_3), resume=True, progress=False)
    suffixes = {p.suffix for p in stopped_at_3.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".jsonl", ".png"}, suffixes
