"""Camera images to the VLM's pixel values, as batched tensor ops (no PIL per sample)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vla_peft.models.image_norm import load_image_norm

# CLIP's statistics: used when a checkpoint ships no image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_stats(processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean / std the checkpoint's own image processor normalises with."""
    image_processor = getattr(processor, "image_processor", None)
    mean = getattr(image_processor, "image_mean", None) or CLIP_MEAN
    std = getattr(image_processor, "image_std", None) or CLIP_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def check_size(height: int, width: int, camera: str, expected_size: int) -> None:
    """Refuse, rather than silently resize, a resolution the policy was not trained at:
    a policy fed other images than its training ones fails quietly in closed loop."""
    if height != expected_size or width != expected_size:
        raise ValueError(
            f"camera {camera!r}: image is {height}x{width} but the policy expects "
            f"{expected_size}x{expected_size}; render the environment with image_size={expected_size} "
            f"or set policy.image_size={height} and retrain"
        )


class PixelNormalizer(nn.Module):
    """float images (B, C, 3, H, W) in [0, 1] -> the VLM's pixel values (B, C, 3, s, s).

    Resized to the vision tower's size, then normalised the way the base was trained:
    per channel with its image processor's mean/std, or, when the checkpoint ships an
    ``image_norm.safetensors`` (the pretrained tiny base does), minus each camera's mean
    scene image and divided by its std. A camera that file has no scene mean for (a foreign
    benchmark's ``corner``) falls back to the processor's mean/std, with one warning: our
    tabletop's mean image would be the wrong background to subtract from another scene.
    """

    def __init__(self, cameras: list[str], model_size: int, processor=None, base_path: str | Path | None = None):
        super().__init__()
        self.model_size = model_size
        norm = load_image_norm(base_path) if base_path is not None else None
        known = norm.means if norm is not None else {}
        missing = [c for c in cameras if c not in known]
        if norm is not None and missing:
            warnings.warn(f"the base's image_norm has no scene mean for camera(s) {missing} (it has {sorted(known)}); "
                          "they are normalised with the image processor's mean/std instead", stacklevel=2)
        channel_mean, channel_std = image_stats(processor)
        means, stds = [], []
        for camera in cameras:
            if camera in known:
                mean = known[camera].float()[None]
                if mean.shape[-1] != model_size:
                    mean = F.interpolate(mean, size=(model_size, model_size), mode="bilinear", antialias=True)
                means.append(mean[0])
                stds.append(torch.full((3, 1, 1), float(norm.std)))
            else:
                means.append(torch.tensor(channel_mean).view(3, 1, 1).expand(3, model_size, model_size))
                stds.append(torch.tensor(channel_std).view(3, 1, 1))
        self.per_pixel = norm is not None
        self.register_buffer("mean", torch.stack(means).contiguous(), persistent=False)
        self.register_buffer("std", torch.stack(stds), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, cams = images.shape[:2]
        flat = images.flatten(0, 1)
        if flat.shape[-1] != self.model_size or flat.shape[-2] != self.model_size:
            flat = F.interpolate(flat, size=(self.model_size, self.model_size), mode="bilinear", antialias=True,
                                 align_corners=False)
        return (flat.view(batch, cams, *flat.shape[1:]) - self.mean) / self.std
