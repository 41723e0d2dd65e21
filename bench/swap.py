"""Hot-swap cost: AdapterBank (unmerged, merged) beside HF peft's set_adapter / load_adapter.

On the tiny base, with 1, 10 and 50 LoRA task bundles resident, it times
  switch  - making another bundle the active one (ours: ``bank.activate``; peft: ``set_adapter``);
            with 1 bundle, from nothing active (ours) / the same adapter again (peft)
  load    - adding one bundle from disk (ours: ``bank.register``, which also builds the head;
            peft: ``load_adapter``)
and the resident memory each extra bundle adds, beside the bytes of the bundle's own tensors.
Targets (issue 7): unmerged switch <= 0.1 ms and flat in the number of bundles; an extra bundle
costs only its own parameters.

    PYTHONPATH=. python bench/swap.py [--reps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_bundles import make_bundles  # noqa: E402

from vla_peft.models import load_vlm, save_tiny_llava  # noqa: E402
from vla_peft.serve import AdapterBank  # noqa: E402

COUNTS = (1, 10, 50)


def resident_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) the modules hold."""
    seen, total = set(), 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total


def file_tensor_bytes(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return sum(t.numel() * t.element_size() for t in map(handle.get_tensor, handle.keys()))


def bundle_bytes(path: Path) -> int:
    """The bundle's own tensors: LoRA A/B, head, queries, proprio projector (float32 as loaded)."""
    return file_tensor_bytes(path / "adapter" / "adapter_model.safetensors") + file_tensor_bytes(path / "policy.safetensors")


def time_calls(call, names: list[str], reps: int, before=None) -> tuple[float, float]:
    """Median and p95 in milliseconds of ``call(name)`` cycling through ``names``."""
    times = []
    for i in range(reps):
        if before is not None:
            before()
        name = names[i % len(names)]
        start = time.perf_counter_ns()
        call(name)
        times.append((time.perf_counter_ns() - start) / 1e6)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def bench_bank(base: Path, paths: list[Path], mode: str, reps: int) -> list[dict]:
    bank = AdapterBank.from_base(base, mode=mode)
    rows, loads = [], []
    for count in COUNTS:
        while len(bank.names) < count:
            start = time.perf_counter()
            bank.register(f"task_{len(bank.names):03d}", paths[len(bank.names)])
            loads.append((time.perf_counter() - start) * 1e3)
        before = bank.unmerge_all if count == 1 else None
        median, p95 = time_calls(bank.activate, bank.names, reps if mode == "unmerged" else max(20, reps // 10), before)
        rows.append({"who": f"ours {mode}", "n": count, "switch": median, "switch_p95": p95,
                     "load": statistics.median(loads[-max(1, count // 2):]),
                     "bytes": resident_bytes(bank.vlm, *bank.policies.values())})
    bank.unmerge_all()
    return rows


def bench_peft(base: Path, paths: list[Path], reps: int) -> list[dict]:
    from peft import PeftModel

    vlm, _ = load_vlm(base)
    model = PeftModel.from_pretrained(vlm, str(paths[0] / "adapter"), adapter_name="task_000")
    names, rows, loads = ["task_000"], [], []
    for count in COUNTS:
        while len(names) < count:
            name = f"task_{len(names):03d}"
            start = time.perf_counter()
            model.load_adapter(str(paths[len(names)] / "adapter"), adapter_name=name)
            loads.append((time.perf_counter() - start) * 1e3)
            names.append(name)
        median, p95 = time_calls(model.set_adapter, names, max(20, reps // 4))
        rows.append({"who": "HF peft", "n": count, "switch": median, "switch_p95": p95,
                     "load": statistics.median(loads[-max(1, count // 2):]) if loads else float("nan"),
                     "bytes": resident_bytes(model)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200, help="timed switches per row (default: 200)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for every row (default: 1, steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny_llava(Path(tmp) / "base", seed=0)
        paths = make_bundles(base, Path(tmp) / "bundles", max(COUNTS))
        own = bundle_bytes(paths[0])
        rows = bench_bank(base, paths, "unmerged", args.reps) + bench_bank(base, paths, "merged", args.reps)
        rows += bench_peft(base, paths, args.reps)

    print(f"\nswitch latency with N LoRA bundles resident (tiny base; a bundle's own tensors: {own / 1024:.1f} KiB)")
    print(f"{'':<15} {'N':>3} {'switch ms':>10} {'p95 ms':>9} {'load ms':>9} {'resident MiB':>13}")
    for row in rows:
        print(f"{row['who']:<15} {row['n']:>3} {row['switch']:>10.4f} {row['switch_p95']:>9.4f} "
              f"{row['load']:>9.2f} {row['bytes'] / 2**20:>13.2f}")
    print("\nresident memory per extra bundle (N=10 -> 50), beside the bundle's own tensors:")
    for who in ("ours unmerged", "ours merged", "HF peft"):
        by_n = {r["n"]: r for r in rows if r["who"] == who}
        extra = (by_n[50]["bytes"] - by_n[10]["bytes"]) / 40
        note = "LoRA only; peft keeps no head" if who == "HF peft" else "LoRA + head + queries + proprio"
        print(f"  {who:<15} {extra / 1024:8.1f} KiB per bundle ({note}; own tensors {own / 1024:.1f} KiB)")
    unmerged = {r["n"]: r["switch"] for r in rows if r["who"] == "ours unmerged"}
    peft = {r["n"]: r["switch"] for r in rows if r["who"] == "HF peft"}
    flat = max(unmerged.values()) <= 0.1
    print(f"\ntarget unmerged switch <= 0.1 ms at every N: {'met' if flat else 'NOT met'} "
          f"({', '.join(f'N={n}: {v * 1000:.1f} us' for n, v in unmerged.items())}); "
          f"HF peft set_adapter is {peft[50] / unmerged[50]:.0f}x slower at N=50")


if __name__ == "__main__":
    main()
