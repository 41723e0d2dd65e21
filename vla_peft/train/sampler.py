"""Which samples each process sees at each optimiser step — a pure function of (seed, step).

The sample order is a stream of seeded permutations, one per epoch. Optimiser step s
takes the global batch at positions [s*B, (s+1)*B) of that stream, split first into the
accumulation micro-batches and then across processes. So a resumed run continues at
exactly the data position it stopped at, and a run on P processes sees the same global
batches as a run on one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, global_batch: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        if global_batch % (world_size * grad_accum):
            raise ValueError(f"batch_size {global_batch} must be divisible by processes ({world_size}) "
                             f"x grad_accum ({grad_accum})")
        if num_samples == 0:
            raise ValueError("the training set is empty")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.per_process = global_batch // (world_size * grad_accum)

    def _epoch(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def global_batch_at(self, step: int) -> list[int]:
        start, end = step * self.global_batch, (step + 1) * self.global_batch
        indices: list[int] = []
        epoch = start // self.num_samples
        while len(indices) < end - start:
            perm = self._epoch(epoch)
            lo = max(start - epoch * self.num_samples, 0)
            hi = min(end - epoch * self.num_samples, self.num_samples)
            indices.extend(perm[lo:hi].tolist())
            epoch += 1
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            batch = self.global_batch_at(step)
            for micro in range(self.grad_accum):
                offset = (micro * self.world_size + self.rank) * self.per_process
                yield batch[offset: offset + self.per_process]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.grad_accum
