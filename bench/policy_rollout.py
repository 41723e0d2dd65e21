"""Minimal closed-loop success rate of a task bundle (the full evaluator is `vla-peft eval`).

    python bench/policy_rollout.py --bundle runs/reach_lora/bundle --task Reach --episodes 50 --seed 1000

Fresh seeds (the demos were collected from seed 0 upwards): episode i resets with seed+i.
Prints one row per run: success rate, mean episode length, seconds per episode.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch

import envs  # noqa: F401  (registers the tasks)
from vla_peft.policy.bundle import load_bundle


def rollout(policy, task: str, episodes: int, seed: int) -> dict:
    """Run ``episodes`` episodes; an episode succeeds when ``info["is_success"]`` is ever true."""
    env = gym.make(f"vla_peft/{task}-v0", image_size=policy.config.image_size,
                   cameras=tuple(policy.config.cameras), terminate_on_success=True)
    successes, lengths = [], []
    try:
        for i in range(episodes):
            obs, info = env.reset(seed=seed + i)
            policy.reset()
            success, steps = False, 0
            while True:
                action = policy.select_action({**obs, "instruction": info["instruction"]})
                obs, _, terminated, truncated, info = env.step(action)
                steps += 1
                success = success or bool(info["is_success"])
                if terminated or truncated or success:
                    break
            successes.append(success)
            lengths.append(steps)
    finally:
        env.close()
    return {"success_rate": float(np.mean(successes)), "mean_length": float(np.mean(lengths)), "episodes": episodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--task", default="Reach")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--base", default=None, help="base checkpoint, if not the one recorded in the bundle")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_bundle(args.bundle, base=args.base)
    start = time.perf_counter()
    result = rollout(policy, args.task, args.episodes, args.seed)
    seconds = time.perf_counter() - start
    print(f"{'task':<10} {'episodes':>8} {'success':>8} {'mean len':>9} {'s/episode':>10}")
    print(f"{args.task:<10} {args.episodes:>8} {result['success_rate']:>8.0%} {result['mean_length']:>9.1f} "
          f"{seconds / args.episodes:>10.2f}")


if __name__ == "__main__":
    main()
