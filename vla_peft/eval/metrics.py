"""Summary statistics of an evaluation: success with a Wilson interval, latency percentiles."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a success rate: unlike the normal approximation it stays inside
    [0, 1] and is honest at 0/n and n/n, which small robot evaluations often hit."""
    if trials <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, trials] (got {successes} of {trials})")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50 / p95 of durations, in milliseconds (None when nothing was timed)."""
    if not seconds:
        return {"p50": None, "p95": None}
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3)}
