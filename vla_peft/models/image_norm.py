"""Per-pixel input normalisation that travels with a checkpoint (``image_norm.safetensors``).

A tiny ViT trained from scratch learns *where* objects are only when the static background
is removed from its input (measured: plain images stayed at chance on grounding questions).
So the tiny pretrained base expects ``(image / 255 - scene_mean[camera]) / std`` instead of
the processor's per-channel CLIP normalisation; every user of that base must apply the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FILENAME = "image_norm.safetensors"


@dataclass
class ImageNorm:
    """The mean scene image of each camera (3, H, W) in [0, 1] and one scalar std."""

    means: dict[str, torch.Tensor]
    std: float

    def pixel_values(self, images: np.ndarray | torch.Tensor, camera: str) -> torch.Tensor:
        """uint8 images (B, H, W, 3) or (H, W, 3) from ``camera`` -> float32 (B, 3, H, W)."""
        if camera not in self.means:
            raise KeyError(f"no scene mean for camera {camera!r}; this checkpoint has {sorted(self.means)}")
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x[None]
        mean = self.means[camera]
        if tuple(x.shape[1:3]) != tuple(mean.shape[1:]):
            raise ValueError(
                f"images are {tuple(x.shape[1:3])} but the base expects {tuple(mean.shape[1:])}; "
                "render the camera at the checkpoint's image size"
            )
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - mean).div_(self.std)


def save_image_norm(path: str | Path, norm: ImageNorm) -> Path:
    """Write ``image_norm.safetensors`` into checkpoint dir ``path`` (atomically)."""
    path = Path(path)
    tensors = {f"mean.{cam}": m.contiguous().float() for cam, m in norm.means.items()}
    tensors["std"] = torch.tensor([norm.std], dtype=torch.float32)
    tmp = path / (FILENAME + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path / FILENAME)
    return path / FILENAME


def load_image_norm(path: str | Path) -> ImageNorm | None:
    """The checkpoint's per-pixel normalisation, or None when it has none (then use the processor)."""
    file = Path(path) / FILENAME
    if not file.is_file():
        return None
    tensors = load_file(str(file))
    means = {k.removeprefix("mean."): v for k, v in tensors.items() if k.startswith("mean.")}
    return ImageNorm(means=means, std=float(tensors["std"][0]))
