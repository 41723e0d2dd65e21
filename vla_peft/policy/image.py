"""Camera images to the VLM's pixel values, as batched tensor ops (no PIL per sample)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# CLIP's statistics: used when a checkpoint ships no image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_stats(processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean / std the checkpoint's own image processor normalises with."""
    image_processor = getattr(processor, "image_processor", None)
    mean = getattr(image_processor, "image_mean", None) or CLIP_MEAN
    std = getattr(image_processor, "image_std", None) or CLIP_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def check_camera_image(image: np.ndarray | torch.Tensor, camera: str, expected_size: int) -> torch.Tensor:
    """A batch of raw camera frames, uint8 (B, H, W, 3) at the policy's resolution, or a clear error."""
    image = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
    if image.dtype != torch.uint8 or image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(
            f"camera {camera!r}: expected uint8 images shaped (H, W, 3) (or batched), got {image.dtype} "
            f"{tuple(image.shape)}; pass the environment's '{camera}_rgb' observation unchanged"
        )
    check_size(image.shape[1], image.shape[2], camera, expected_size)
    return image


def check_size(height: int, width: int, camera: str, expected_size: int) -> None:
    """Refuse, rather than silently resize, a resolution the policy was not trained at:
    a policy fed other images than its training ones fails quietly in closed loop."""
    if height != expected_size or width != expected_size:
        raise ValueError(
            f"camera {camera!r}: image is {height}x{width} but the policy expects "
            f"{expected_size}x{expected_size}; render the environment with image_size={expected_size} "
            f"or set policy.image_size={height} and retrain"
        )


def to_pixel_values(images: torch.Tensor, model_size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> (B, 3, model_size, model_size) normalised as the VLM expects."""
    if images.shape[-1] != model_size or images.shape[-2] != model_size:
        images = F.interpolate(images, size=(model_size, model_size), mode="bilinear", antialias=True,
                               align_corners=False)
    return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
