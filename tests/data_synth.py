"""Synthetic demonstrations for the data tests: random but reproducible, in our layout or LIBERO's."""

from __future__ import annotations

import json

import h5py
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


def make_libero_file(path, lengths=(5, 7), size=16):
    """A file as LIBERO ships it: its obs names, instruction only in `problem_info`, no toolkit attributes."""
    rng = np.random.default_rng(3)
    arrays = []
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps(
            {"problem_name": "libero_spatial_pick", "domain_name": "kitchen", "language_instruction": "pick up the black bowl"}
        )
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation"})
        data.attrs["bddl_file_name"] = "pick.bddl"
        for i, steps in enumerate(lengths):
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = steps
            item = {
                "actions": rng.uniform(-1, 1, (steps, 7)),
                "agentview_rgb": rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8),
                "eye_in_hand_rgb": rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8),
                "ee_pos": rng.normal(size=(steps, 3)),
                "gripper_states": rng.normal(size=(steps, 2)),
                "joint_states": rng.normal(size=(steps, 7)),
            }
            demo.create_dataset("actions", data=item["actions"])
            demo.create_dataset("states", data=rng.normal(size=(steps, 40)))
            demo.create_dataset("rewards", data=np.zeros(steps, np.uint8))
            demo.create_dataset("dones", data=np.eye(steps, dtype=np.uint8)[-1])
            for key in ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "gripper_states", "joint_states"):
                demo.create_dataset(f"obs/{key}", data=item[key])
            arrays.append(item)
    return arrays
