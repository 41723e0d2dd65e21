"""Timing rows that a bench compares, on a machine other jobs share.

The rows take turns (A B C ... A B C ...): each round times every row once, so a change of load
hits all rows alike, and a ratio is taken per round (row / reference in the same round) before
its median. Each figure is reported as median and min (the least disturbed round) with its
spread, the interquartile range over the median; a spread above ``SPREAD_LIMIT`` is flagged as
too wide to trust. On one CPU thread the clock is that thread's CPU time, which other processes'
load does not inflate (torch runs every op on the calling thread then).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

SPREAD_LIMIT = 0.15


@dataclass
class Timing:
    """Seconds (or ratios) of one row, one value per round."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def spread(self) -> float:
        """Interquartile range over the median (the full range under 4 rounds)."""
        if len(self.values) < 2:
            return 0.0
        if len(self.values) < 4:
            return (max(self.values) - min(self.values)) / self.median
        q1, _, q3 = statistics.quantiles(self.values, n=4)
        return (q3 - q1) / self.median if self.median else 0.0

    @property
    def trusted(self) -> bool:
        return self.spread <= SPREAD_LIMIT


def best_clock() -> Callable[[], float]:
    """CPU time of the calling thread on one CPU thread; wall time otherwise (several threads, a GPU)."""
    if torch.get_num_threads() == 1 and not torch.cuda.is_available():
        return time.thread_time
    return time.perf_counter


def interleave(rows: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float] | None = None,
               warmup: int = 1, progress: str | None = None) -> dict[str, Timing]:
    """Call every row once per round, in turn, ``warmup`` untimed rounds first. A row that returns a
    number reports its own seconds (one that times itself, e.g. in a subprocess); otherwise the call is
    timed with ``clock`` (default ``best_clock()``), CUDA synchronised around it."""
    clock = clock or best_clock()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in rows}
    counter = range(warmup + rounds)
    if progress:
        from tqdm import tqdm

        counter = tqdm(counter, desc=progress, leave=False)
    for i in counter:
        for name, row in rows.items():
            sync()
            start = clock()
            reported = row()
            sync()
            seconds = clock() - start
            if i >= warmup:
                times[name].append(float(reported) if isinstance(reported, (int, float)) else seconds)
    return {name: Timing(values) for name, values in times.items()}


def ratio(row: Timing, reference: Timing) -> Timing:
    """Per-round ratios row / reference: the machine's drift between rounds cancels."""
    return Timing([a / b for a, b in zip(row.values, reference.values)])


def table(timings: dict[str, Timing], reference: str | None = None, unit: str = "ms", scale: float = 1e3,
          label: str = "") -> str:
    """Rows of median, min and spread, and (with ``reference``) the per-round ratio's median, min and
    spread; the last column says which figures are too noisy to trust."""
    header = f"{label:<26} {'median ' + unit:>10} {'min ' + unit:>10} {'spread':>7}"
    if reference is not None:
        header += f" {'x median':>9} {'x min':>7} {'x spread':>8}"
    lines = [header + "  trust"]
    for name, t in timings.items():
        line = f"{name:<26} {t.median * scale:>10.3f} {t.min * scale:>10.3f} {100 * t.spread:>6.1f}%"
        noisy = not t.trusted
        if reference is not None:
            r = ratio(t, timings[reference])
            line += f" {r.median:>9.3f} {t.min / timings[reference].min:>7.3f} {100 * r.spread:>7.1f}%"
            noisy = noisy or not r.trusted
        lines.append(line + ("  NO: spread > {:.0f} %".format(100 * SPREAD_LIMIT) if noisy else "  yes"))
    return "\n".join(lines)


class Worker:
    """A row in its own subprocess (so that its peak memory is its own), kept up between rounds: its
    command runs ``serve`` and this drives it line by line."""

    def __init__(self, name: str, command: list[str]) -> None:
        import subprocess

        self.name = name
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"row {self.name} failed (exit {self.proc.wait()}); its stderr above says why")

    def steps(self, count: int) -> float:
        """Seconds per step over ``count`` steps, timed by the worker."""
        self.proc.stdin.write(f"{count}\n")
        self.proc.stdin.flush()
        return float(self._expect("TIME "))

    def finish(self) -> dict:
        """The worker's closing report (``serve``'s ``report()``)."""
        import json

        self.proc.stdin.write("END\n")
        self.proc.stdin.flush()
        result = json.loads(self._expect("RESULT "))
        self.proc.wait()
        return result


def interleave_workers(commands: dict[str, list[str]], rounds: int, steps: int) -> tuple[dict[str, Timing], dict]:
    """One kept-up ``Worker`` per row (started one after another, so their start-ups are not timed
    against each other), ``steps`` steps of each per round; the timings and each worker's report."""
    workers: dict[str, Worker] = {}
    try:
        for name, command in commands.items():
            workers[name] = Worker(name, command)
        times = interleave({name: (lambda w=w: w.steps(steps)) for name, w in workers.items()}, rounds, warmup=0)
        return times, {name: w.finish() for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.proc.kill()


def serve(step: Callable[[], None], report: Callable[[], dict]) -> None:
    """The worker side: say READY, answer each line ``k`` on stdin with ``TIME <seconds per step>`` over
    k steps (timed by ``best_clock``), and ``END`` with ``RESULT <json of report()>``."""
    import json
    import sys

    clock = best_clock()
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "END":
            break
        count = int(line)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = clock()
        for _ in range(count):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        print(f"TIME {(clock() - start) / count}", flush=True)
    print("RESULT " + json.dumps(report()), flush=True)
