"""Hot-swap cost: AdapterBank (unmerged, merged) beside HF peft's set_adapter / load_adapter.

On the tiny base, with 1, 10 and 50 LoRA task bundles resident, it times
  switch  - making another bundle the active one (ours: ``bank.activate``; peft: ``set_adapter``);
            with 1 bundle, from nothing active (ours) / the same adapter again (peft)
  load    - adding one bundle from disk (ours: ``bank.register``, which also builds the head;
            peft: ``load_adapter``); it is removed again untimed (``bank.remove``, ``delete_adapter``),
            so every round's load finds exactly N resident
and the resident memory each extra bundle adds, beside the bytes of the bundle's own tensors.
Targets (issue 7): unmerged switch <= 0.1 ms and flat in the number of bundles; an extra bundle
costs only its own parameters. Issue 21: a load <= 10 ms at every N, N = 1, 10, 50 within 20 %.
All nine rows (three contenders x three N) take turns, round after round (bench/interleave.py).

    PYTHONPATH=. python bench/swap.py [--reps 200] [--rounds 7] [--loads 30] [--threads 1]
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

from interleave import SPREAD_LIMIT, best_clock, interleave  # noqa: E402

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


def per_call(call, names: list[str], reps: int, before=None) -> float:
    """Median seconds of ``call(name)`` cycling through ``names`` (``before`` runs untimed ahead of each)."""
    times = []
    for i in range(reps):
        if before is not None:
            before()
        start = time.perf_counter_ns()
        call(names[i % len(names)])
        times.append((time.perf_counter_ns() - start) / 1e9)
    return statistics.median(times)


def timed_then_undone(add, undo) -> float:
    """Seconds of ``add()`` on the bench's clock; ``undo(its result)`` then runs untimed."""
    clock = best_clock()
    start = clock()
    name = add()
    seconds = clock() - start
    undo(name)
    return seconds


class Ours:
    """An AdapterBank holding ``count`` bundles; ``load`` adds one more, ``switch`` times activations."""

    def __init__(self, base: Path, paths: list[Path], mode: str, count: int) -> None:
        self.bank, self.paths, self.mode = AdapterBank.from_base(base, mode=mode), paths, mode
        self.switch_names = [self.add() for _ in range(count)]

    def add(self) -> str:
        name = f"task_{len(self.bank.names):03d}"
        self.bank.register(name, self.paths[len(self.bank.names) % len(self.paths)])
        return name

    def load(self) -> float:
        """Seconds to register one more bundle, which is then removed (untimed): N stays N."""
        return timed_then_undone(self.add, self.bank.remove)

    def switch(self, reps: int) -> float:
        names = self.switch_names
        before = self.bank.unmerge_all if len(names) == 1 else None  # with one bundle: from nothing active
        return per_call(self.bank.activate, names, reps if self.mode == "unmerged" else max(20, reps // 10), before)

    def resident(self) -> int:
        return resident_bytes(self.bank.vlm, *self.bank.policies.values())


class Peft:
    """HF peft's PeftModel with ``count`` adapters; ``load`` is ``load_adapter``, ``switch`` ``set_adapter``."""

    def __init__(self, base: Path, paths: list[Path], count: int) -> None:
        from peft import PeftModel

        self.paths = paths
        self.model = PeftModel.from_pretrained(load_vlm(base)[0], str(paths[0] / "adapter"), adapter_name="task_000")
        self.names = ["task_000"]
        while len(self.names) < count:
            self.add()
        self.switch_names = list(self.names)

    def add(self) -> str:
        name = f"task_{len(self.names):03d}"
        self.model.load_adapter(str(self.paths[len(self.names) % len(self.paths)] / "adapter"), adapter_name=name)
        self.names.append(name)
        return name

    def load(self) -> float:
        """Seconds of ``load_adapter``; the adapter is deleted again (untimed): N stays N."""
        return timed_then_undone(self.add, lambda name: self.model.delete_adapter(self.names.pop()))

    def switch(self, reps: int) -> float:
        return per_call(self.model.set_adapter, self.switch_names, max(20, reps // 4))

    def resident(self) -> int:
        return resident_bytes(self.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200, help="switches per round and row (default: 200)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds: loads and switch batches per row (default: 7)")
    parser.add_argument("--loads", type=int, default=30, help="interleaved rounds of loads per row (default: 30)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for every row (default: 1, steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny_llava(Path(tmp) / "base", seed=0)
        paths = make_bundles(base, Path(tmp) / "bundles", max(COUNTS))
        own = bundle_bytes(paths[0])
        rows = {(who, n): make(n) for n in COUNTS for who, make in (
            ("ours unmerged", lambda n: Ours(base, paths, "unmerged", n)),
            ("ours merged", lambda n: Ours(base, paths, "merged", n)),
            ("HF peft", lambda n: Peft(base, paths, n)))}
        resident = {key: row.resident() for key, row in rows.items()}
        switch = interleave({key: (lambda row=row: row.switch(args.reps)) for key, row in rows.items()}, args.rounds,
                            clock=time.perf_counter)
        load = interleave({key: row.load for key, row in rows.items()}, args.loads)

    print(f"\nswitch and load with N LoRA bundles resident (tiny base; a bundle's own tensors: {own / 1024:.1f} KiB); "
          f"{args.rounds} interleaved rounds of switches, {args.loads} of loads, timed by {best_clock().__name__}; "
          "each load finds N resident (the bundle it added is removed again, untimed)")
    print(f"{'':<15} {'N':>3} {'switch us':>10} {'spread':>7} {'load ms':>8} {'min':>7} {'spread':>7} {'resident MiB':>13}  trust")
    for (who, n), t in load.items():
        s = switch[who, n]
        trust = "yes" if t.trusted and s.trusted else f"NO: spread > {100 * SPREAD_LIMIT:.0f} %"
        print(f"{who:<15} {n:>3} {s.median * 1e6:>10.2f} {100 * s.spread:>6.1f}% {t.median * 1e3:>8.2f} {t.min * 1e3:>7.2f} "
              f"{100 * t.spread:>6.1f}% {resident[who, n] / 2**20:>13.2f}  {trust}")
    print("\nresident memory per extra bundle (N=10 -> 50), beside the bundle's own tensors:")
    for who in ("ours unmerged", "ours merged", "HF peft"):
        extra = (resident[who, 50] - resident[who, 10]) / 40
        note = "LoRA only; peft keeps no head" if who == "HF peft" else "LoRA + head + queries + proprio"
        print(f"  {who:<15} {extra / 1024:8.1f} KiB per bundle ({note}; own tensors {own / 1024:.1f} KiB)")
    switches = {n: switch["ours unmerged", n].median for n in COUNTS}
    loads = {n: load["ours unmerged", n].median for n in COUNTS}
    flat = max(loads.values()) <= 1.2 * min(loads.values())
    print(f"\ntarget unmerged switch <= 0.1 ms at every N: {'met' if max(switches.values()) <= 1e-4 else 'NOT met'} "
          f"({', '.join(f'N={n}: {v * 1e6:.1f} us' for n, v in switches.items())}); HF peft set_adapter is "
          f"{switch['HF peft', 50].median / switches[50]:.0f}x slower at N=50")
    print(f"target load <= 10 ms at every N: {'met' if max(loads.values()) <= 0.010 else 'NOT met'}; flat within 20 %: "
          f"{'met' if flat else 'NOT met'} ({', '.join(f'N={n}: {v * 1e3:.1f} ms' for n, v in loads.items())}, "
          f"max/min {max(loads.values()) / min(loads.values()):.2f})")


if __name__ == "__main__":
    main()
