"""Rollout videos with the instruction written above the picture (PIL's built-in bitmap font,
so no font files or extra dependencies)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_WIDTH = 256  # small policy images are scaled up (nearest) so the caption stays legible
LINE_HEIGHT = 12


def captioned(frame: np.ndarray, text: str, status: str = "") -> np.ndarray:
    """``frame`` (H, W, 3) scaled to at least MIN_WIDTH wide, under a black band with ``text``
    (wrapped) and an optional ``status`` line (step, success)."""
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8))
    if image.width < MIN_WIDTH:
        scale = -(-MIN_WIDTH // image.width)
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    chars = max(8, image.width // 6)  # the default bitmap font is about 6 px per character
    lines = textwrap.wrap(text, chars)[:3] + ([status] if status else [])
    band = LINE_HEIGHT * len(lines) + 6
    height = image.height + band
    canvas = Image.new("RGB", (image.width, height + height % 2), (0, 0, 0))  # even size for H.264
    canvas.paste(image, (0, band))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((3, 3 + row * LINE_HEIGHT), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def save_video(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    """Write frames to ``path`` (.mp4 or .gif), atomically, through the envs package's writer."""
    from envs.video import write_video

    return write_video(frames, path, fps=fps)
