"""L1 vs flow-matching head on ReachSide's bimodal demonstrations, without the VLM: the cheapest
closed-loop measurement of what the head alone does with two modes.

Each head reads K query states made by a small MLP from the true state (the grasp point and the
named cube's position, ``target_pos``), so perception is out of the comparison (as in the notes'
behaviour cloning on true positions). It is trained on the scripted expert's ReachSide episodes
(seeds 200000...), then run closed loop on fresh seeds (1000...), executing 4 of each chunk of 8.
The table gives success, the share of episodes that end on the left (the expert's: half), and where
the episodes end: at the nearest side goal (success) or over the cube itself (between the goals: the
average of the two modes).

    PYTHONPATH=. python bench/heads_multimodal.py [--demos 200] [--steps 1500] [--episodes 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import envs
from vla_peft.policy.flow import FlowHead
from vla_peft.policy.heads import ContinuousHead

CHUNK, EXECUTE, HIDDEN, WIDTH = 8, 4, 64, 128


def features(obs: dict, env) -> np.ndarray:
    return np.concatenate([obs["ee_pos"], env.unwrapped.task_positions()["target_pos"]]).astype(np.float32)


def collect(episodes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, 6), action chunks (N, K, 4), valid-step masks (N, K)) of every expert frame."""
    env = gym.make("vla_peft/ReachSide-v0", render_images=False, terminate_on_success=True)
    expert = envs.make_expert(env)
    xs, chunks, masks = [], [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        frames, actions, done = [], [], False
        while not done:
            frames.append(features(obs, env))
            actions.append(expert(obs))
            obs, _, terminated, truncated, _ = env.step(actions[-1])
            done = terminated or truncated
        actions = np.stack(actions)
        for t in range(len(actions)):
            chunk = np.zeros((CHUNK, 4), np.float32)
            valid = actions[t:t + CHUNK]
            chunk[:len(valid)] = valid
            xs.append(frames[t])
            chunks.append(chunk)
            masks.append(np.arange(CHUNK) < len(valid))
    env.close()
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(chunks)), torch.from_numpy(np.stack(masks))


class StatePolicy(nn.Module):
    """True state -> K query states -> the head under test."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.queries = nn.Sequential(nn.Linear(6, 256), nn.GELU(), nn.Linear(256, CHUNK * HIDDEN))
        self.head = head

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.queries(x * 5.0).view(-1, CHUNK, HIDDEN))  # positions are +-0.25 m: scale to ~1


def train(policy: StatePolicy, data, steps: int) -> float:
    x, y, mask = data
    optimiser = torch.optim.Adam(policy.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(len(x), (64,))
        loss = policy.head.loss(policy.output(x[index]), y[index], mask[index])["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    policy.eval()
    return time.perf_counter() - start


@torch.no_grad()
def rollouts(policy: StatePolicy, episodes: int, seed: int) -> dict[str, float]:
    env = gym.make("vla_peft/ReachSide-v0", render_images=False, terminate_on_success=True)
    base = env.unwrapped
    wins, to_goal, to_cube, left = 0, [], [], 0
    for episode in range(episodes):
        obs, info = env.reset(seed=seed + episode)
        done, queue = False, []
        while not done:
            if not queue:
                chunk = policy.head.decode(policy.output(torch.from_numpy(features(obs, env))[None]))[0]
                queue = list(chunk[:EXECUTE].clamp(-1, 1).numpy())
            obs, _, terminated, truncated, info = env.step(queue.pop(0))
            done = terminated or truncated
        wins += bool(info["is_success"])
        distances = np.linalg.norm(base.side_goals() - base.ee_pos, axis=1)
        to_goal.append(distances.min())
        left += bool(distances[0] < distances[1])
        to_cube.append(np.linalg.norm((base.ee_pos - base.cube_pos(0))[:2]))
    env.close()
    return {"success": wins / episodes, "goal_cm": 100 * float(np.mean(to_goal)), "cube_cm": 100 * float(np.mean(to_cube)),
            "left": left / episodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", type=int, default=200, help="expert episodes to train on (default: 200)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per head, batch 64 (default: 1500)")
    parser.add_argument("--episodes", type=int, default=50, help="closed-loop episodes per head (default: 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    data = collect(args.demos, seed=200_000)
    heads = {"L1 (continuous)": lambda: ContinuousHead(HIDDEN, 4, CHUNK, WIDTH),
             "flow, 10 steps": lambda: FlowHead(HIDDEN, 4, CHUNK, WIDTH, layers=2, steps=10)}
    rows = {}
    for name, make in heads.items():
        torch.manual_seed(0)
        policy = StatePolicy(make())
        seconds = train(policy, data, args.steps)
        rows[name] = {**rollouts(policy, args.episodes, seed=1000), "train_s": seconds}
    print(f"\nReachSide (bimodal: left or right of the cube), true-state inputs, {len(data[0])} frames of "
          f"{args.demos} demos, {args.steps} steps, {args.episodes} fresh seeds from 1000")
    print(f"{'':<18} {'success':>8} {'ends left':>10} {'end to nearest goal cm':>23} {'end to cube (x, y) cm':>22} "
          f"{'train s':>8}")
    for name, r in rows.items():
        print(f"{name:<18} {r['success']:>8.0%} {r['left']:>10.0%} {r['goal_cm']:>23.1f} {r['cube_cm']:>22.1f} "
              f"{r['train_s']:>8.0f}")


if __name__ == "__main__":
    main()
