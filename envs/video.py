"""Rollout videos (mp4 through imageio-ffmpeg, or gif) from any camera of a tabletop env."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    """Write uint8 HxWx3 frames to .mp4 or .gif atomically (temp name, then rename)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"video path must end in .mp4 or .gif, got {path.name!r}")
    if len(frames) == 0:
        raise ValueError("no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{suffix}")
    if suffix == ".mp4":
        # macro_block_size=1 keeps small frames (e.g. 96x96) at their size
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1) as w:
            for f in frames:
                w.append_data(np.asarray(f, dtype=np.uint8))
    else:
        imageio.mimsave(tmp, [np.asarray(f, dtype=np.uint8) for f in frames], duration=1.0 / fps, loop=0)
    os.replace(tmp, path)
    return path


def record_episode(
    env: gym.Env,
    policy: Callable[[dict[str, np.ndarray]], np.ndarray],
    path: str | Path,
    camera: str = "agentview",
    size: int = 128,
    seed: int | None = None,
    max_steps: int | None = None,
) -> dict:
    """Roll `policy` out for one episode, filming `camera` at size x size; returns a summary."""
    base = env.unwrapped
    obs, info = env.reset(seed=seed)
    frames = [base.render_camera(camera, size)]
    steps, success = 0, bool(info["is_success"])
    while max_steps is None or steps < max_steps:
        obs, _, terminated, truncated, info = env.step(policy(obs))
        frames.append(base.render_camera(camera, size))
        steps += 1
        success = bool(info["is_success"])
        if terminated or truncated:
            break
    write_video(frames, path, fps=base.control_hz)
    return {"path": str(path), "steps": steps, "is_success": success, "instruction": base.instruction}
