"""A small synthetic demonstration file for the policy and training tests.

Each episode shows a bright square at a random place in a 32x32 image; the action
moves towards it (dx, dy from the square's position, dz from the state) and the
gripper closes (+1) in the second half of the episode, so the gripper convention
(-1 open, +1 close) is exercised end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vla_peft.data import DemoWriter, Episode

IMAGE_SIZE = 32


def frame(x: float, y: float, step: int) -> np.ndarray:
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 40, np.uint8)
    col, row = int((x + 1) / 2 * (IMAGE_SIZE - 6)), int((y + 1) / 2 * (IMAGE_SIZE - 6))
    image[row:row + 6, col:col + 6] = (230, 60, 60)
    image[0, : step % IMAGE_SIZE] = 255  # a time marker, so the gripper phase is visible
    return image


def write_demos(path: Path, episodes: int = 6, steps: int = 10, action_dim: int = 4, seed: int = 0,
                instructions: tuple[str, ...] = ("reach the red cube", "touch the red block")) -> Path:
    rng = np.random.default_rng(seed)
    with DemoWriter(path, {"env_id": "synthetic", "image_size": IMAGE_SIZE}) as writer:
        for e in range(episodes):
            x, y = rng.uniform(-1, 1, 2)
            ee = rng.uniform(-1, 1, (steps, 3)).astype(np.float32)
            images = np.stack([frame(x, y, t) for t in range(steps)])
            actions = np.zeros((steps, action_dim), np.float32)
            actions[:, 0], actions[:, 1] = 0.8 * x, 0.8 * y
            actions[:, 2] = -0.5 * ee[:, 2]
            actions[:, -1] = np.where(np.arange(steps) < steps // 2, -1.0, 1.0)
            writer.add(Episode(
                actions=actions,
                obs={"agentview_rgb": images, "ee_pos": ee,
                     "gripper_states": np.where(actions[:, -1:] > 0, 0.0, 0.04).repeat(2, 1).astype(np.float32),
                     "target_pos": np.tile(np.float32([x, y, 0.0]), (steps, 1))},  # privileged, as collect records it
                instruction=instructions[e % len(instructions)],
            ))
    return path
