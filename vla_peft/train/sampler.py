"""Which samples each process sees at each optimiser step — a pure function of (seed, step).

The sample order is a stream of seeded permutations, one per epoch. Optimiser step s
takes the global batch at positions [s*B, (s+1)*B) of that stream, split first into the
accumulation micro-batches and then across processes. So a resumed run continues at
exactly the data position it stopped at, and a run on P processes sees the same global
batches as a run on one.

With grounding-only frames (``DataConfig.grounding_paths``, the last ``grounding_samples``
indices) each global batch takes a fixed number of them from a second stream of the same
kind, so their share of every batch stays what the config says however many there are.

Each yielded index comes with a draw seed, a pure function of (seed, step, place in the global
batch), that the dataset's augmentation draws from instead of torch's global RNG: so the crops
and colour jitter of a resumed run, of any number of processes and of DataLoader workers are
those of one uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, global_batch: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                 grounding_samples: int = 0, grounding_per_batch: int = 0):
        if global_batch % (world_size * grad_accum):
            raise ValueError(f"batch_size {global_batch} must be divisible by processes ({world_size}) "
                             f"x grad_accum ({grad_accum})")
        if num_samples - grounding_samples <= 0:
            raise ValueError("the training set has no demonstration frames")
        if grounding_samples and not 0 < grounding_per_batch < global_batch:
            raise ValueError(f"grounding frames per batch must be in (0, batch_size={global_batch}), "
                             f"got {grounding_per_batch}: change data.grounding_fraction")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.grounding_samples = grounding_samples
        self.grounding_per_batch = grounding_per_batch if grounding_samples else 0
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.per_process = global_batch // (world_size * grad_accum)

    @staticmethod
    def _stream(size: int, seed: int, start: int, end: int) -> list[int]:
        """Positions [start, end) of the stream of seeded permutations of range(size), one per epoch."""
        indices: list[int] = []
        epoch = start // size
        while len(indices) < end - start:
            perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            lo = max(start - epoch * size, 0)
            hi = min(end - epoch * size, size)
            indices.extend(perm[lo:hi].tolist())
            epoch += 1
        return indices

    def global_batch_at(self, step: int) -> list[int]:
        per_batch = self.global_batch - self.grounding_per_batch
        demos = self.num_samples - self.grounding_samples
        indices = self._stream(demos, self.seed, step * per_batch, (step + 1) * per_batch)
        if not self.grounding_per_batch:
            return indices
        g = self.grounding_per_batch
        indices += [demos + i for i in self._stream(self.grounding_samples, self.seed + 1, step * g, (step + 1) * g)]
        order = torch.randperm(self.global_batch, generator=torch.Generator().manual_seed(self.seed * 100_003 - step - 1))
        return [indices[i] for i in order.tolist()]  # every micro-batch and process gets a mix

    def draw_seed(self, step: int, place: int) -> int:
        """The augmentation seed of the sample at ``place`` in global batch ``step``."""
        return int(np.random.SeedSequence([self.seed, step, place]).generate_state(1, np.uint64)[0])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Per micro-batch: (sample index, draw seed) pairs, which DemoDataset takes as indices."""
        for step in range(self.start_step, self.total_steps):
            batch = self.global_batch_at(step)
            for micro in range(self.grad_accum):
                offset = (micro * self.world_size + self.rank) * self.per_process
                yield [(batch[i], self.draw_seed(step, i)) for i in range(offset, offset + self.per_process)]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.grad_accum
