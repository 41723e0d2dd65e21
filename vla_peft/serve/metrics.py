"""Counters the server reports at ``/metrics``: requests, errors, latency percentiles, batching."""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

WINDOW = 4096  # latency percentiles are over the most recent requests


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.status: Counter = Counter()
        self.per_task: Counter = Counter()
        self.batch_sizes: Counter = Counter()
        self._latency_ms: deque = deque(maxlen=WINDOW)

    def record_status(self, status: int) -> None:
        """Every HTTP answer, whatever the endpoint (refusals included)."""
        with self._lock:
            self.requests += 1
            self.status[status] += 1

    def record_act(self, task: str, latency_s: float, batch_size: int) -> None:
        with self._lock:
            self.per_task[task] += 1
            self.batch_sizes[batch_size] += 1
            self._latency_ms.append(latency_s * 1000.0)

    def snapshot(self) -> dict:
        with self._lock:
            latency = np.array(self._latency_ms)
            acts = sum(self.per_task.values())
            return {
                "requests": self.requests,
                "acts": acts,
                "client_errors": sum(n for s, n in self.status.items() if 400 <= s < 500),
                "server_errors": sum(n for s, n in self.status.items() if s >= 500),
                "by_status": {str(s): n for s, n in sorted(self.status.items())},
                "per_task": dict(self.per_task),
                "act_latency_ms": {
                    "p50": round(float(np.percentile(latency, 50)), 3) if latency.size else None,
                    "p95": round(float(np.percentile(latency, 95)), 3) if latency.size else None,
                    "window": int(latency.size),
                },
                "mean_batch_size": round(sum(s * n for s, n in self.batch_sizes.items()) / acts, 3) if acts else None,
            }
