"""Policy inference latency at batch 1 on the tiny base: no PEFT, LoRA unmerged, LoRA merged.

Each row times ``predict_chunk`` on one observation (one forward pass of vision tower, language
model and action head) and divides by the actions a chunk executes (``execute_steps``) for the
cost per action. LoRA rows run through an AdapterBank, as on a robot.

    PYTHONPATH=. python bench/inference_latency.py [--reps 30] [--threads 1]
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
from tiny_bundles import make_bundles, observation  # noqa: E402

from vla_peft.models import load_vlm, save_tiny_llava  # noqa: E402
from vla_peft.policy.bundle import load_bundle  # noqa: E402
from vla_peft.serve import AdapterBank  # noqa: E402


def chunk_ms(policies: dict, obs: dict, reps: int) -> dict[str, list[float]]:
    """Interleaved: each round times every row once, so a load change on the machine hits all rows alike."""
    for policy in policies.values():
        for _ in range(3):
            policy.predict_chunk(obs)
    times: dict[str, list[float]] = {name: [] for name in policies}
    for _ in range(reps):
        for name, policy in policies.items():
            start = time.perf_counter()
            policy.predict_chunk(obs)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30, help="timed chunks per row (default: 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    obs = observation(batch=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny_llava(Path(tmp) / "base", seed=0)
        lora = make_bundles(base, Path(tmp) / "lora", 10)
        plain = make_bundles(base, Path(tmp) / "plain", 1, lora=False)[0]
        vlm, processor = load_vlm(base)
        policies = {"base (no PEFT)": load_bundle(plain, vlm=vlm, processor=processor)}
        for mode in ("unmerged", "merged"):
            bank = AdapterBank.from_base(base, mode=mode)
            bank.register("task", lora[0])
            policies[f"LoRA {mode}"] = bank.activate("task")
        bank = AdapterBank.from_base(base)
        for i, path in enumerate(lora):
            bank.register(f"task_{i}", path)
        policies["LoRA unmerged, 10 resident"] = bank.activate("task_3")
        # each bank's policy switched its own base; the rows share nothing but the machine
        for name, times in chunk_ms(policies, obs, args.reps).items():
            rows.append((name, statistics.median(times), sorted(times)[int(0.95 * (len(times) - 1))],
                         policies[name].config.execute_steps))
    reference = rows[0][1]
    print(f"\ninference latency at batch 1, tiny base, {args.threads} thread(s), {args.reps} chunks per row")
    print(f"{'':<28} {'chunk p50 ms':>13} {'chunk p95 ms':>13} {'per action ms':>14} {'vs base':>8}")
    for name, p50, p95, steps in rows:
        print(f"{name:<28} {p50:>13.2f} {p95:>13.2f} {p50 / steps:>14.2f} {p50 / reference:>7.2f}x")


if __name__ == "__main__":
    main()
