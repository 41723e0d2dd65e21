"""Speed of the tabletop envs: physics-only steps/s, steps/s with camera images, and
rendered frames/s per camera and image size, with the GL renderer in use (a software
renderer such as llvmpipe is hundreds of times slower than a GPU).

    PYTHONPATH=$PWD python bench/env_speed.py
"""

from __future__ import annotations

import argparse
import os
import time

import envs  # noqa: F401  (picks the headless GL backend before mujoco loads)

import gymnasium as gym
from envs.base import CAMERAS


def steps_per_second(task: str, steps: int, **kwargs) -> float:
    env = gym.make(f"vla_peft/{task}-v0", **kwargs)
    env.reset(seed=0)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(steps)]
    t0 = time.perf_counter()
    for a in actions:
        if any(env.step(a)[2:4]):
            env.reset()
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def frames_per_second(camera: str, size: int, frames: int) -> float:
    env = gym.make("vla_peft/PickPlace-v0", render_images=False)
    env.reset(seed=0)
    base = env.unwrapped
    base.render_camera(camera, size)  # create the renderer outside the timing
    t0 = time.perf_counter()
    for _ in range(frames):
        base.render_camera(camera, size)
    rate = frames / (time.perf_counter() - t0)
    env.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 256])
    args = parser.parse_args()

    print(f"GL renderer: {envs.gl_renderer_name()} (MUJOCO_GL={os.environ.get('MUJOCO_GL')})")
    print("control 10 Hz = 50 physics substeps of 2 ms per env step\n")
    print(f"{'task':10s} {'physics only':>13s} {'2 cams 64px':>12s} {'2 cams 96px':>12s}   (env steps/s)")
    for task in envs.TASKS:
        phys = steps_per_second(task, args.steps, render_images=False)
        img64 = steps_per_second(task, args.steps // 3, image_size=64)
        img96 = steps_per_second(task, args.steps // 3, image_size=96)
        print(f"{task:10s} {phys:13.0f} {img64:12.0f} {img96:12.0f}")

    print(f"\n{'camera':10s} " + " ".join(f"{s:>6d}px" for s in args.sizes) + "   (rendered frames/s)")
    for camera in CAMERAS:
        rates = [frames_per_second(camera, s, args.frames) for s in args.sizes]
        print(f"{camera:10s} " + " ".join(f"{r:8.0f}" for r in rates))
    print(f"\n(numbers from one process on {os.cpu_count()} cores; rates share the CPU with anything else running)")


if __name__ == "__main__":
    main()
