"""Success rate of each task's scripted expert and of a uniformly random policy.

The expert counts as successful when the episode *ends* in success (what a demonstration
needs); the random policy counts if it succeeds at *any* step (the harder bar for the claim
that the tasks are not trivially solved). Physics only (render_images=False).

    PYTHONPATH=$PWD python bench/expert_success.py --episodes 100
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
from tqdm import tqdm

import envs


def run(task: str, policy_name: str, seeds: range) -> dict:
    env = gym.make(f"vla_peft/{task}-v0", render_images=False)
    successes, first_success, unstable = 0, [], 0
    for seed in tqdm(seeds, desc=f"{task:9s} {policy_name}", leave=False):
        obs, info = env.reset(seed=seed)
        env.action_space.seed(seed)
        policy = envs.make_expert(env) if policy_name == "expert" else (lambda o: env.action_space.sample())
        ever, step, done = False, 0, False
        while not done:
            obs, _, terminated, truncated, info = env.step(policy(obs))
            step += 1
            if info["is_success"] and not ever:
                ever = True
                first_success.append(step)
            unstable += info["physics_unstable"]
            done = terminated or truncated
        successes += info["is_success"] if policy_name == "expert" else ever
    env.close()
    return {
        "rate": successes / len(seeds),
        "first": float(np.mean(first_success)) if first_success else float("nan"),
        "unstable": unstable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed-start", type=int, default=100_000, help="fresh seeds, not the tests'")
    parser.add_argument("--tasks", nargs="+", default=list(envs.TASKS))
    args = parser.parse_args()
    seeds = range(args.seed_start, args.seed_start + args.episodes)

    rows = []
    for task in args.tasks:
        t0 = time.perf_counter()
        expert = run(task, "expert", seeds)
        rand = run(task, "random", seeds)
        rows.append((task, expert, rand, time.perf_counter() - t0))

    print(f"\n{args.episodes} seeds per task from {args.seed_start}; renderer-free physics")
    print(f"{'task':10s} {'limit':>5s} {'expert':>7s} {'steps to success':>17s} {'random':>7s} {'unstable':>8s} {'time':>6s}")
    for task, e, r, secs in rows:
        print(
            f"{task:10s} {envs.MAX_EPISODE_STEPS[task]:5d} {e['rate']:7.0%} {e['first']:17.1f} "
            f"{r['rate']:7.0%} {e['unstable'] + r['unstable']:8d} {secs:5.0f}s"
        )


if __name__ == "__main__":
    main()
