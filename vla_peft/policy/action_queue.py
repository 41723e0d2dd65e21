"""Action chunking: which predicted actions get executed, shared by `select_action` and batched rollouts."""

from __future__ import annotations

from collections import deque

import numpy as np


class ActionQueues:
    """Per-slot action chunking with the rules of ``VLAPolicy.select_action``: execute
    ``execute_steps`` of each chunk then re-plan, or with ``temporal_ensemble`` m > 0 re-plan
    every step and average the overlapping predictions with weights exp(-m * age rank) (ACT),
    oldest first. A chunk is (K, A), or (..., K, A) for a batch in one slot."""

    def __init__(self, num: int, config) -> None:
        self.config = config
        self.queues = [deque() for _ in range(num)]
        self.history: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(num)]
        self.step = [0] * num

    def reset(self, slot: int) -> None:
        self.queues[slot].clear()
        self.history[slot] = []
        self.step[slot] = 0

    def needs_chunk(self, slot: int) -> bool:
        return self.config.temporal_ensemble > 0 or not self.queues[slot]

    @property
    def binarize_chunks(self) -> bool | None:
        """Chunks to average must keep the raw gripper value (None: the policy's own setting)."""
        return False if self.config.temporal_ensemble > 0 else None

    @property
    def actions_per_chunk(self) -> int:
        return 1 if self.config.temporal_ensemble > 0 else self.config.execute_steps

    def push(self, slot: int, chunk: np.ndarray) -> None:
        if self.config.temporal_ensemble > 0:
            self.history[slot].append((self.step[slot], chunk))
        else:
            self.queues[slot].extend(np.moveaxis(chunk, -2, 0)[: self.config.execute_steps])

    def pop(self, slot: int) -> np.ndarray:
        m = self.config.temporal_ensemble
        if m > 0:
            now, k = self.step[slot], self.config.chunk_size
            self.history[slot] = [(t, c) for t, c in self.history[slot] if now - t < k]
            preds = np.stack([c[..., now - t, :] for t, c in self.history[slot]])
            weights = np.exp(-m * np.arange(len(preds)))
            action = np.tensordot(weights / weights.sum(), preds, axes=1).astype(np.float32)
            grip = self.config.gripper_index
            if grip is not None and self.config.binarize_gripper:
                action[..., grip] = np.where(action[..., grip] >= 0, 1.0, -1.0)
        else:
            action = self.queues[slot].popleft()
        self.step[slot] += 1
        return action
