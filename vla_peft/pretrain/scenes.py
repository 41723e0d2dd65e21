"""Render pretraining scenes from the robot tasks and describe them from privileged state.

Every task's table (Reach, Push, PickPlace, Stack) is reset with its own randomisation and
then driven by its scripted expert with noisy actions, so snapshots show the gripper
everywhere, open and closed, cubes lifted and stacked. Most scenes are instead *posed*: a
fresh reset with the gripper put anywhere, open or closed, and sometimes a cube put in its
fingers or against them — no physics, so they cost a render each, and every one is a new
layout (measured: the number of distinct layouts, not of frames, decides whether a tiny
vision tower generalises). For each snapshot both cameras are rendered and every cube, pad
and the grasp point is projected into each image; the questions (questions.py) are
generated from those projections, never from the pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import envs  # before mujoco: it picks the headless GL backend
import gymnasium as gym
import mujoco
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from envs.scene import CUBE_HALF

CAMERAS = ("agentview", "wrist")
OPEN_FINGER = 0.025  # finger joint (m) above which the gripper counts as open
EDGE = 0.03  # an object whose centre projects closer than this to the border counts as unseen


@dataclass
class SceneSet:
    """Images (N, H, W, 3) uint8 and, per image, its camera and its objects in image coordinates."""

    images: torch.Tensor
    annotations: list[dict]

    def __len__(self) -> int:
        return len(self.annotations)

    def save(self, path: str | Path) -> None:
        """One safetensors file (annotations as JSON metadata), written atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"images": self.images.contiguous()}, str(tmp), metadata={"annotations": json.dumps(self.annotations)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "SceneSet":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            annotations = json.loads(f.metadata()["annotations"])
        return cls(images=load_file(str(path))["images"], annotations=annotations)


def project(model: mujoco.MjModel, data: mujoco.MjData, camera: str, points: np.ndarray, size: int) -> np.ndarray:
    """World points (K, 3) -> (K, 3): u, v in [0, 1] (u rightwards, v downwards) and depth (> 0 in front).

    Uses the pinhole model MuJoCo renders with: square image, vertical field of view ``cam_fovy``.
    """
    cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    rot = data.cam_xmat[cam].reshape(3, 3)  # columns: camera x (right), y (up), z (backwards)
    local = (points - data.cam_xpos[cam]) @ rot
    depth = -local[:, 2]
    focal = 0.5 / np.tan(np.deg2rad(model.cam_fovy[cam]) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = 0.5 + focal * local[:, 0] / depth
        v = 0.5 - focal * local[:, 1] / depth
    return np.stack([u, v, depth], axis=1)


def describe(env, camera: str) -> dict:
    """Everything a question may ask about one camera's image of the env's current state."""
    base = env.unwrapped
    state = base.privileged_state()
    kinds = [("cube", c, p) for c, p in zip(base.cube_colours, state["cube_pos"])]
    kinds += [("pad", c, p) for c, p in zip(base.pad_colours, state["pad_pos"])]
    points = np.array([p for _, _, p in kinds] + [state["ee_pos"]], dtype=np.float64)
    uvd = project(base.model, base.data, camera, points, base.image_size)

    def seen(u: float, v: float, d: float) -> bool:
        return bool(d > 0 and EDGE <= u <= 1 - EDGE and EDGE <= v <= 1 - EDGE)

    objects = [
        {"kind": kind, "colour": colour, "u": float(u), "v": float(v), "visible": seen(u, v, d),
         "x": float(p[0]), "y": float(p[1]), "z": float(p[2])}
        for (kind, colour, p), (u, v, d) in zip(kinds, uvd[:-1])
    ]
    u, v, d = uvd[-1]
    gripper = {
        "u": float(u),
        "v": float(v),
        "visible": camera != "wrist" and seen(u, v, d),  # the wrist camera rides on the gripper
        "open": bool(np.mean(state["gripper_states"]) > OPEN_FINGER),
        "x": float(state["ee_pos"][0]), "y": float(state["ee_pos"][1]), "z": float(state["ee_pos"][2]),
    }
    return {"camera": camera, "task": base.task_name, "objects": objects, "gripper": gripper}


def render_scenes(
    n: int,
    seed: int,
    image_size: int,
    cameras: tuple[str, ...] = CAMERAS,
    snapshots_per_episode: int = 4,
    action_noise: float = 0.3,
    dash_fraction: float = 0.5,
    posed_fraction: float = 0.0,
    progress: bool = True,
) -> SceneSet:
    """``n`` images (``len(cameras)`` per snapshot), deterministic in ``seed``.

    Episodes cycle through the tasks; each is reset from a seed drawn from ``seed``. A share
    ``posed_fraction`` of them is one posed snapshot (``_pose``); the others are photographed
    at their start and after each of a few short segments: either some steps of the noisy
    scripted expert (grasps, lifts, stacks) or, with probability ``dash_fraction``, a quick
    move of the gripper to a random point with a random grip (a few physics steps).
    ``action_noise=0, dash_fraction=0`` gives frames of the expert's own episodes.
    """
    env_by_task = {t: gym.make(f"vla_peft/{t}-v0", image_size=image_size, render_images=False) for t in envs.TASKS}
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    annotations: list[dict] = []
    bar = tqdm(total=n, desc="rendering scenes", unit="img", disable=not progress)
    episode = 0
    try:
        while len(images) < n:
            env = env_by_task[envs.TASKS[episode % len(envs.TASKS)]]
            episode += 1
            expert = envs.make_expert(env)
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            posed = posed_fraction > 0 and rng.random() < posed_fraction  # no draw at 0: old scene sets stay as they were
            if posed:
                _pose(env.unwrapped, rng)
            for shot in range(1 if posed else snapshots_per_episode):
                if shot > 0:
                    obs = _segment(env, expert, obs, rng, action_noise, dash_fraction)
                for camera in cameras:
                    images.append(env.unwrapped.render_camera(camera))
                    annotations.append(describe(env, camera))
                    bar.update(1)
    finally:
        bar.close()
        for env in env_by_task.values():
            env.close()
    return SceneSet(images=torch.from_numpy(np.stack(images[:n])), annotations=annotations[:n])


def _pose(base, rng: np.random.Generator) -> None:
    """Put the gripper anywhere in reach, open or closed; half the time a cube is in its fingers
    (lifted or on the table) and a quarter of the time one touches its side, as when pushing."""
    ee = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(0.03, 0.25)])
    fingers = rng.choice([base._finger_open, 0.0, base._finger_closed])
    luck = rng.random()
    if base.n_cubes and luck < 0.5:  # a grasped cube: its centre at the grasp point
        ee[2] = rng.choice([CUBE_HALF, rng.uniform(CUBE_HALF, 0.2)])
        base.set_cube(int(rng.integers(base.n_cubes)), ee[:2], z=ee[2], yaw=float(rng.uniform(-0.4, 0.4)))
        fingers = CUBE_HALF - 0.001
    elif base.n_cubes and luck < 0.75:  # pushing: the fingers against a resting cube
        i = int(rng.integers(base.n_cubes))
        angle = rng.uniform(0, 2 * np.pi)
        ee = base.cube_pos(i) + np.array([np.cos(angle), np.sin(angle), 0.0]) * 2.2 * CUBE_HALF
        ee[2] = rng.uniform(0.015, 0.04)
    base.data.qpos[base._ee_qpos] = ee
    base.data.qpos[base._finger_qpos] = fingers
    mujoco.mj_forward(base.model, base.data)


def _segment(env, expert, obs: dict, rng: np.random.Generator, action_noise: float, dash_fraction: float) -> dict:
    """A few control steps: the noisy expert, or a dash to a random point with a random grip."""
    base = env.unwrapped
    if rng.random() < 1.0 - dash_fraction:
        for _ in range(int(rng.integers(4, 16))):
            action = expert(obs) + rng.normal(0.0, action_noise, size=4).astype(np.float32)
            obs, *_ = env.step(np.clip(action, -1.0, 1.0))
        return obs
    target = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(0.03, 0.25)])
    grip = float(rng.choice([-1.0, 1.0]))
    for _ in range(5):
        delta = np.clip((target - base.ee_pos) / base.max_delta, -1.0, 1.0)
        obs, *_ = env.step(np.append(delta, grip).astype(np.float32))
    return obs
