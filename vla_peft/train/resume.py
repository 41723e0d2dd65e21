"""Choosing what ``--resume`` continues from, and refusing a config that would not continue it.

A resumed run must end as the uninterrupted run would have, so the config is compared with the
one stored in the checkpoint before anything loads. Only settings that do not change what is
trained may differ (``BOOKKEEPING``), and ``train.steps`` may grow (the run is extended, as
``pretrain-base --resume`` allows); a shrunk one, or any other difference, is one error naming
every key that differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import SafetensorError

from vla_peft.train.checkpoint import list_checkpoints, load_checkpoint

BOOKKEEPING = {f"train.{key}" for key in ("output_dir", "threads", "num_workers", "tensorboard", "log_every",
                                          "eval_every", "val_batches", "save_every", "keep_last", "steps")}
BOOKKEEPING |= {"policy.eval_crop_grid"}  # test-time augmentation only: the trained weights do not depend on it


def newest_readable_checkpoint(run_dir: Path) -> tuple[Path, tuple]:
    """The newest checkpoint that loads, and what it holds; each newer unreadable one is named in one line."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"--resume given but {Path(run_dir) / 'checkpoints'} holds no complete checkpoint")
    for path in reversed(checkpoints):
        try:
            return path, load_checkpoint(path)
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            older = [p.name for p in checkpoints if p.name < path.name]
            then = f"trying {older[-1]}" if older else "no older checkpoint is left"
            print(f"warning: checkpoint {path} is unreadable ({type(err).__name__}: {str(err)[:80]}); {then}",
                  file=sys.stderr, flush=True)
    raise ValueError(f"--resume: no checkpoint under {Path(run_dir) / 'checkpoints'} can be read; "
                     "delete the folder and train afresh, or choose another train.output_dir")


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (lists compared whole)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(stored: dict | None, requested: dict, step: int, checkpoint: Path) -> None:
    """Raise one ValueError if ``requested`` (this run's config) would not continue the checkpoint's run."""
    if step > requested["train"]["steps"]:
        raise ValueError(f"--resume: train.steps={requested['train']['steps']} is below the checkpoint's step {step} "
                         f"({checkpoint}); give train.steps >= {step}, or choose another train.output_dir")
    if stored is None:  # written before checkpoints recorded their config
        return
    old, new = flatten(json.loads(json.dumps(stored))), flatten(json.loads(json.dumps(requested)))
    differ = [key for key in sorted(set(old) | set(new)) if key not in BOOKKEEPING and old.get(key) != new.get(key)]
    if differ:
        changes = ", ".join(f"{key} ({old.get(key)!r} -> {new.get(key)!r})" for key in differ)
        raise ValueError(f"--resume: this config changes {changes} of the run in {checkpoint}; resume with the "
                         "run's settings, or choose another train.output_dir for a new run")
