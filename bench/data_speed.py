"""Demonstration loader speed and file size.

Collects a small set with the scripted expert (or reads --file), then prints samples/s of
the DataLoader with 0 and 2 workers (streaming from HDF5 and from the in-memory cache),
each as a ratio to 0-worker streaming measured in the same process, and the file size per
frame against the raw (uncompressed) size.

    PYTHONPATH=. python bench/data_speed.py [--file demos.hdf5] [--episodes 10] [--image-size 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from vla_peft.data import DataConfig, DemoDataset
from vla_peft.data.collect import CollectConfig, collect, format_summary


def samples_per_second(dataset: DemoDataset, workers: int, batch_size: int, epochs: int) -> float:
    """One warm-up batch (workers started), then full epochs."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    next(iter(loader))
    start = time.perf_counter()
    count = 0
    for _ in range(epochs):
        for batch in loader:
            count += len(batch["actions"])
    return count / (time.perf_counter() - start)


def file_sizes(path: Path) -> tuple[int, int, int]:
    """(frames, bytes on disk, raw bytes of every array)."""
    raw = 0
    with h5py.File(path, "r") as f:
        frames = int(f["data"].attrs["total"])

        def add(_, item):
            nonlocal raw
            if isinstance(item, h5py.Dataset):
                raw += item.size * item.dtype.itemsize

        f["data"].visititems(add)
    return frames, path.stat().st_size, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", help="an existing demonstration file (default: collect one)")
    parser.add_argument("--task", default="PickPlace", help="task to collect (default: PickPlace)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to collect (default: 10)")
    parser.add_argument("--image-size", type=int, default=96, help="image side (default: 96)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per row (default: 2)")
    parser.add_argument("--chunk", type=int, default=8, help="action chunk length (default: 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default: 1; "
                        "DataLoader workers always use 1, and on a busy machine more threads only spin)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.file) if args.file else Path(tmp) / "demos.hdf5"
        if not args.file:
            summary = collect(CollectConfig(task=args.task, episodes=args.episodes, out=str(path), image_size=args.image_size), progress=False)
            print("collected:", format_summary(summary))
        frames, on_disk, raw = file_sizes(path)
        print(f"\nfile: {frames} frames, {on_disk / frames / 1e3:.2f} kB/frame on disk, "
              f"{raw / frames / 1e3:.2f} kB/frame raw, compression x{raw / on_disk:.1f}\n")

        config = dict(paths=[str(path)], cameras=["agentview", "wrist"], chunk_size=args.chunk, history=1)
        rows = []
        for label, extra in (("streaming", {}), ("cached", {"cache": True}), ("streaming+augment", {"augment": True})):
            dataset = DemoDataset(DataConfig(**config, **extra))
            for workers in (0, 2):
                rows.append((label, workers, samples_per_second(dataset, workers, args.batch_size, args.epochs)))
        reference = rows[0][2]
        print(f"{'loader':<20} {'workers':>7} {'samples/s':>10} {'vs streaming/0':>15}")
        for label, workers, speed in rows:
            print(f"{label:<20} {workers:>7} {speed:>10.0f} {speed / reference:>14.2f}x")
        print(f"\n(images {args.image_size}x{args.image_size}, 2 cameras, chunk {args.chunk}, batch {args.batch_size}; "
              f"{len(dataset)} samples per epoch, {args.threads} torch thread(s) in the main process)")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
