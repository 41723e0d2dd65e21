"""Synthetic demonstrations for the data tests: random but reproducible, in our layout or LIBERO's."""

from __future__ import annotations

import numpy as np

from vla_peft.data import DemoWriter, Episode


def synthetic_episode(rng: np.random.Generator, steps: int, size: int = 16, cameras=("agentview", "wrist")) -> Episode:
    obs = {f"{camera}_rgb": rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8) for camera in cameras}
    obs["ee_pos"] = rng.normal(size=(steps, 3)).astype(np.float32)
    obs["gripper_states"] = rng.uniform(0, 0.04, size=(steps, 2)).astype(np.float32)
    rewards = np.zeros(steps, np.float32)
    rewards[-1] = 1
    dones = np.zeros(steps, np.uint8)
    dones[-1] = 1
    return Episode(
        actions=rng.uniform(-1, 1, size=(steps, 4)).astype(np.float32),
        obs=obs,
        instruction=f"pick up the block number {int(rng.integers(100))}",
        rewards=rewards,
        dones=dones,
        attrs={"seed": int(rng.integers(1000)), "success": True},
    )


def write_synthetic(path, lengths=(5, 9, 3), seed: int = 0, size: int = 16, env_args=None) -> list[Episode]:
    """Write episodes of the given lengths to `path` and return them."""
    rng = np.random.default_rng(seed)
    episodes = [synthetic_episode(rng, steps, size) for steps in lengths]
    with DemoWriter(path, env_args or {"env_name": "synthetic", "env_kwargs": {"image_size": size}}) as writer:
        for episode in episodes:
            writer.add(episode)
    return episodes
