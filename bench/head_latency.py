"""Chunk latency of each action head at batch 1 on the tiny base (no PEFT): L1 (continuous),
discrete (256 bins) and flow matching at 5, 10 and 20 Euler steps.

Each row times ``predict_chunk`` on one observation. The VLM runs once per chunk for every head;
the flow head adds ``flow_steps`` passes of its action expert, timed alone in the last column.

    PYTHONPATH=. python bench/head_latency.py [--reps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_latency import chunk_ms  # noqa: E402
from tiny_bundles import _normalizers, observation  # noqa: E402

from vla_peft.models import load_vlm, save_tiny_llava  # noqa: E402
from vla_peft.policy import PolicyConfig, VLAPolicy  # noqa: E402

ROWS = {"L1 (continuous)": {"head": "continuous"}, "discrete (256 bins)": {"head": "discrete"},
        "flow, 5 steps": {"head": "flow", "flow_steps": 5}, "flow, 10 steps": {"head": "flow", "flow_steps": 10},
        "flow, 20 steps": {"head": "flow", "flow_steps": 20}}


def head_ms(policy: VLAPolicy, obs: dict, reps: int) -> float:
    """Median time of the head alone (for the flow head: its integration) on fixed query states."""
    with torch.no_grad():
        hidden = policy.query_hidden(*policy.observation_inputs(obs))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            policy.head.decode(policy.head(hidden))
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30, help="timed chunks per row (default: 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    obs = observation(batch=1)
    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny_llava(Path(tmp) / "base", seed=0)
        vlm, processor = load_vlm(base)
        policies = {}
        for name, overrides in ROWS.items():
            torch.manual_seed(0)
            config = PolicyConfig(base=str(base), image_size=64, state_dim=5, chunk_size=8, execute_steps=4, **overrides)
            policies[name] = VLAPolicy(config, vlm, processor).eval()
            policies[name].normalizers = _normalizers(config.action_dim, config.state_dim)
        times = chunk_ms(policies, obs, args.reps)
        heads = {name: head_ms(policy, obs, args.reps) for name, policy in policies.items()}
    reference = statistics.median(times["L1 (continuous)"])
    print(f"\naction-head latency at batch 1, tiny base, chunk 8, {args.threads} thread(s), {args.reps} chunks per row")
    print(f"{'':<22} {'chunk p50 ms':>13} {'chunk p95 ms':>13} {'vs L1':>7} {'head alone ms':>14}")
    for name, row in times.items():
        p50, p95 = statistics.median(row), sorted(row)[int(0.95 * (len(row) - 1))]
        print(f"{name:<22} {p50:>13.2f} {p95:>13.2f} {p50 / reference:>6.2f}x {heads[name]:>14.2f}")


if __name__ == "__main__":
    main()
