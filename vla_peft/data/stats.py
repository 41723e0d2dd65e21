"""Normalisation statistics of actions and proprio state, and the normalisers built on them.

Modes (forward; `unnormalize` is the exact inverse except where clipping cut values off):
  q01_q99   2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1]   (OpenVLA's "bounds_q99")
  min_max   2 (x - min) / (max - min) - 1                        (LeRobot's MIN_MAX)
  mean_std  (x - mean) / std                                     (LeRobot's MEAN_STD)
  none      x
Each denominator is floored at 1% of the dimension's magnitude (max |x|): a dimension that
barely moves in the demos (an idle gripper's finger width, a resting cube's height) keeps its
simulator jitter as jitter. Measured: at std 1e-4 the fingers' 3e-4 m wobble became ±2.7 units
of state, and a cube settling by 1e-5 m became -333, which sent a policy off the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors.torch import load, save_file

MODES = ("q01_q99", "min_max", "mean_std", "none")
EPS = 1e-8
SCALE_FLOOR = 0.01  # fraction of a dimension's magnitude below which its spread is not divided by


@dataclass
class Stats:
    """Per-dimension statistics of one quantity over every frame of a dataset."""

    NAMES: ClassVar[tuple[str, ...]] = ("mean", "std", "min", "max", "q01", "q99")

    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    q01: np.ndarray
    q99: np.ndarray
    count: int

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.NAMES}

    @classmethod
    def concat(cls, parts: list[Stats]) -> Stats:
        """Stats of side-by-side features (e.g. `ee_pos` then `gripper_states`): per-dimension, so exact."""
        return cls(
            **{name: np.concatenate([np.atleast_1d(getattr(part, name)) for part in parts]) for name in cls.NAMES},
            count=parts[0].count,
        )


def compute_stats(values: np.ndarray) -> Stats:
    """Statistics over the first axis (frames) of an (N, ...) array, in float64, as numpy computes them."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    return Stats(
        mean=values.mean(axis=0),
        std=values.std(axis=0),
        min=values.min(axis=0),
        max=values.max(axis=0),
        q01=np.quantile(values, 0.01, axis=0),
        q99=np.quantile(values, 0.99, axis=0),
        count=len(values),
    )


class Normalizer:
    """Map one quantity (actions or state) to a normalised range and back."""

    def __init__(self, stats: Stats, mode: str = "q01_q99"):
        if mode not in MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}; use one of {MODES}")
        self.stats = stats
        self.mode = mode
        floor = SCALE_FLOOR * np.maximum(np.abs(stats.min), np.abs(stats.max))
        if mode == "mean_std":
            self._offset, self._scale = stats.mean, np.maximum(stats.std, floor) + EPS
        elif mode in ("q01_q99", "min_max"):
            low, high = (stats.q01, stats.q99) if mode == "q01_q99" else (stats.min, stats.max)
            # x -> (x - low) / (high - low) * 2 - 1  ==  (x - centre) / half_range
            self._offset, self._scale = (low + high) / 2, np.maximum((high - low) / 2, floor) + EPS / 2
        else:
            self._offset, self._scale = np.zeros_like(stats.mean), np.ones_like(stats.mean)

    def _params(self, x):
        if isinstance(x, torch.Tensor):
            return (torch.as_tensor(self._offset, dtype=x.dtype, device=x.device),
                    torch.as_tensor(self._scale, dtype=x.dtype, device=x.device))
        return self._offset.astype(np.asarray(x).dtype), self._scale.astype(np.asarray(x).dtype)

    def normalize(self, x):
        """Raw -> normalised; works on numpy arrays and torch tensors whose last axis is the feature."""
        if self.mode == "none":
            return x
        offset, scale = self._params(x)
        y = (x - offset) / scale
        if self.mode == "q01_q99":
            y = y.clamp(-1, 1) if isinstance(y, torch.Tensor) else np.clip(y, -1, 1)
        return y

    def unnormalize(self, y):
        """Normalised -> raw (what a policy's output needs before it reaches the robot)."""
        if self.mode == "none":
            return y
        offset, scale = self._params(y)
        return y * scale + offset


def save_normalizers(path: str | Path, normalizers: dict[str, Normalizer]) -> None:
    """Save named normalisers (e.g. {"actions": ..., "state": ...}) to one safetensors file, atomically."""
    path = Path(path)
    tensors, modes = {}, {}
    for name, normalizer in normalizers.items():
        modes[name] = {"mode": normalizer.mode, "count": normalizer.stats.count}
        for stat, array in normalizer.stats.as_dict().items():
            tensors[f"{name}.{stat}"] = torch.as_tensor(np.asarray(array, dtype=np.float64))
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"normalizers": json.dumps(modes)})
    tmp.replace(path)


def load_normalizers(path: str | Path) -> dict[str, Normalizer]:
    """Inverse of save_normalizers."""
    # Read once, whole (a few hundred bytes; a bank's load reads one per bundle), the metadata taken
    # from the safetensors header: 8 bytes of length, then the JSON header.
    data = Path(path).read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    modes = json.loads(header["__metadata__"]["normalizers"])
    tensors = load(data)
    return {
        name: Normalizer(
            Stats(**{stat: tensors[f"{name}.{stat}"].numpy() for stat in Stats.NAMES}, count=info["count"]), info["mode"]
        )
        for name, info in modes.items()
    }
