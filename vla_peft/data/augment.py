"""Training-time image augmentation and the deterministic crop that matches it at evaluation.

As OpenVLA does: a crop of a fixed fraction of the image area at a random place, resized
back to the full size, plus a small colour jitter while training; at evaluation the same
fraction is cropped from the centre, so train and test images show the scene at one scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def to_float_chw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [0, 1]."""
    images = torch.as_tensor(images)
    return images.movedim(-1, -3).float().div_(255.0)


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of float (..., 3, H, W) images to (height, width)."""
    flat = images.reshape(-1, *images.shape[-3:])
    resized = F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(*images.shape[:-2], height, width)


@dataclass
class ImageAugment:
    """`crop_scale` is the kept fraction of the area; jitter factors are drawn from [1 - j, 1 + j]."""

    crop_scale: float = 0.9
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")

    def _crop_size(self, height: int, width: int) -> tuple[int, int]:
        side = math.sqrt(self.crop_scale)
        return max(1, round(height * side)), max(1, round(width * side))

    def _crop_resize(self, images: torch.Tensor, top: int, left: int, crop_h: int, crop_w: int) -> torch.Tensor:
        height, width = images.shape[-2:]
        crop = images[..., top : top + crop_h, left : left + crop_w]
        if (crop_h, crop_w) == (height, width):
            return crop
        return resize(crop, height, width)

    def train(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random crop + colour jitter of float (..., 3, H, W) images; one draw for the whole stack
        (so the frames of a history move together). Draws from ``generator`` (training passes one
        seeded per sample, so resume is exact), else from torch's global RNG."""
        height, width = images.shape[-2:]
        crop_h, crop_w = self._crop_size(height, width)
        top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
        images = self._crop_resize(images, top, left, crop_h, crop_w)
        factors = (torch.rand(3, generator=generator) * 2 - 1) * torch.tensor([self.brightness, self.contrast, self.saturation]) + 1
        images = images * factors[0]
        mean = images.mean(dim=(-3, -2, -1), keepdim=True)
        images = (images - mean) * factors[1] + mean
        gray = (images * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(dim=-3, keepdim=True)
        images = (images - gray) * factors[2] + gray
        return images.clamp_(0, 1)

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        """The centre crop of the same area, resized back: apply this to every image the policy sees at test time."""
        height, width = images.shape[-2:]
        crop_h, crop_w = self._crop_size(height, width)
        return self._crop_resize(images, (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)

    def eval_grid(self, images: torch.Tensor, n: int) -> torch.Tensor:
        """Test-time augmentation: the evaluation crop at n x n evenly spaced places (the centre one
        for n = 1), stacked along a new first dimension, so predictions can be averaged over them."""
        if n == 1:
            return self.eval(images)[None]
        height, width = images.shape[-2:]
        crop_h, crop_w = self._crop_size(height, width)
        tops = np.linspace(0, height - crop_h, n).round().astype(int)
        lefts = np.linspace(0, width - crop_w, n).round().astype(int)
        return torch.stack([self._crop_resize(images, int(t), int(l), crop_h, crop_w) for t in tops for l in lefts])
