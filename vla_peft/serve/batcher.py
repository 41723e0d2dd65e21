"""One worker thread owns the AdapterBank, so requests for different tasks never race a swap.

Requests queue up while the worker is busy; each time it wakes it takes everything waiting
(up to ``max_batch``) and runs as few forward passes as it can: in an unmerged bank, requests
whose tasks share inputs and outputs go into one mixed batch with each row's own adapter
(``AdapterBank.predict_mixed``); in a merged bank (one task in the weights at a time) they are
grouped by task, with one swap per group. A batch that fails is run again row by row, so one
bad request cannot fail the others (the server also checks each request before it queues).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vla_peft.serve.bank import AdapterBank
from vla_peft.serve.mixed import SHARED_FIELDS
from vla_peft.serve.wire import RequestError


@dataclass
class Job:
    task: str
    obs: dict
    binarize: bool | None
    fn: Callable[[AdapterBank], object] | None = None  # bank work other than acting (activate)
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class Answer:
    chunk: np.ndarray     # (K, A) raw actions
    batch_size: int       # how many requests shared the forward pass
    queue_s: float        # waiting for the worker
    compute_s: float      # the forward pass (and swap) this request was part of


class TaskBatcher:
    """Serialises all bank work on one thread; ``submit`` returns a future per request."""

    def __init__(self, bank: AdapterBank, max_batch: int = 16, max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.bank, self.max_batch = bank, max_batch
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="policy-worker", daemon=True)
        self._thread.start()

    def submit(self, task: str, obs: dict, binarize: bool | None = None) -> Future:
        """Queue one observation of ``task``; the future resolves to an ``Answer``."""
        return self._put(Job(task, obs, binarize))

    def call(self, fn: Callable[[AdapterBank], object]) -> Future:
        """Run ``fn(bank)`` on the worker between batches (e.g. ``activate``)."""
        return self._put(Job("", {}, None, fn=fn))

    def _put(self, job: Job) -> Future:
        if self._closing:
            raise RequestError("the server is shutting down; retry on the restarted server", status=503)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RequestError(f"the server is overloaded ({self._queue.maxsize} requests waiting); retry shortly",
                               status=503) from None
        return job.future

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish what is queued, stop the worker."""
        self._closing = True
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:  # close(): finish these, then stop
                    self._run(jobs)
                    return
                jobs.append(job)
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            if job.fn is not None:
                self._resolve([job], lambda: [job.fn(self.bank)])
            else:
                groups.setdefault(self._group_key(job), []).append(job)
        for group in groups.values():
            self._act(group)

    def _act(self, group: list[Job]) -> None:
        """One forward pass for ``group``; if it fails, each request again on its own, so a request
        that slipped past the checks fails alone and the others still get their answers."""
        if len(group) == 1:
            return self._resolve(group, lambda: self._forward(group))
        try:
            answers = self._forward(group)
        except Exception:  # noqa: BLE001 - which row is at fault is found by running them one by one
            for job in group:
                self._act([job])
            return
        for job, answer in zip(group, answers):
            job.future.set_result(answer)

    def _group_key(self, job: Job) -> tuple:
        """Requests with the same key share one forward pass."""
        if self.bank.mode != "unmerged":
            return job.binarize, job.task
        config = self.bank.policies[job.task].config
        return job.binarize, tuple(repr(getattr(config, name)) for name in SHARED_FIELDS)

    def _forward(self, group: list[Job]) -> list[Answer]:
        start = time.perf_counter()
        batch = {"instruction": [job.obs["instruction"] for job in group]}
        for key in group[0].obs:
            if key != "instruction":
                batch[key] = np.stack([job.obs[key] for job in group])
        tasks = [job.task for job in group]
        binarize = group[0].binarize
        if len(set(tasks)) == 1:
            chunks = self.bank.activate(tasks[0]).predict_chunk(batch, binarize_gripper=binarize)
        else:
            chunks = self.bank.predict_mixed(batch, tasks, binarize_gripper=binarize)
        compute = time.perf_counter() - start
        return [Answer(chunk, len(group), start - job.queued, compute) for job, chunk in zip(group, chunks)]

    @staticmethod
    def _resolve(group: list[Job], work: Callable) -> None:
        try:
            results = work()
        except Exception as err:  # noqa: BLE001 - handed to the waiting requests, never kills the worker
            for job in group:
                job.future.set_exception(err)
            return
        for job, result in zip(group, results):
            job.future.set_result(result)
