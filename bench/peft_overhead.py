"""LoRA overhead on the tiny LLaVA: vla_peft beside HF peft, same process, same config.

    PYTHONPATH=. python bench/peft_overhead.py [--steps 30] [--batch 8] [--threads 1]

Prints training-step time and training memory for LoRA (ours vs peft), and forward latency
at batch 1 for the base, unmerged LoRA and merged LoRA (ours and peft), with ratios.
Targets: our training step <= 1.0x peft's; our merged forward within 2% of the base.

Runs are interleaved between the contenders, so that load from other processes hits all
alike; the table gives the median and the minimum (the least disturbed run, what timeit
reports) of each, and ratios of both. On the CPU there is no allocator peak to read, so "memory" is
what a training step holds beyond the frozen weights: tensors saved for backward (counted
once per storage) + gradients + AdamW state; on CUDA it is the allocator's peak.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch
from tqdm import tqdm

from vla_peft import LoraConfig, inject, load_vlm, merge_lora, save_tiny_llava, unmerge_lora
from vla_peft.peft.lora import lora_layers


def make_inputs(model, batch: int, text_len: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, cfg.text_config.vocab_size, (batch, text_len), generator=g)
    image = torch.full((batch, cfg.image_seq_length), cfg.image_token_index)
    size = cfg.vision_config.image_size
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "labels": ids.masked_fill(ids == cfg.image_token_index, -100),
    }


class Trainer:
    """One model with its AdamW; ``step`` runs forward, backward and the update."""

    def __init__(self, model, inputs, device):
        self.model = model.to(device).train()
        self.inputs = {k: v.to(device) for k, v in inputs.items()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.device = device

    def step(self) -> None:
        loss = self.model(**self.inputs).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def memory_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.step()
        frozen_weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        saved = sum(n for ptr, n in seen.items() if ptr not in frozen_weights)
        grads = sum(p.numel() * p.element_size() for p in self.params)
        adam = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        return (saved + grads + adam) / 2**20


def clock(device) -> Callable[[], float]:
    """Wall time on CUDA; on a single CPU thread, that thread's CPU time, which other
    processes' load does not inflate (torch runs every op on the calling thread then)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def timed(fn, device) -> float:
    now = clock(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return now() - start


def interleaved(fns: dict, runs: int, device, desc: str) -> dict[str, tuple[float, float]]:
    """(median, min) seconds of each function, the functions taking turns."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(runs), desc=desc, leave=False):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def row(name: str, t: tuple[float, float], ref: tuple[float, float], extra: str = "") -> str:
    return f"{name:<20} {1e3 * t[0]:>9.2f} {1e3 * t[1]:>9.2f} {t[0] / ref[0]:>8.3f} {t[1] / ref[1]:>8.3f}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per contender")
    parser.add_argument("--forwards", type=int, default=200, help="timed batch-1 forwards per variant")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps timings steady on a shared machine)")
    args = parser.parse_args()
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LoraConfig(r=args.r, alpha=2 * args.r, dropout=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llava(tmp)
        base = load_vlm(path)[0].to(device)
        ours = load_vlm(path)[0]
        inject(ours, config)
        targets = sorted(lora_layers(ours))
        theirs = get_peft_model(
            load_vlm(path)[0], PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)
        )

    # Training step: time and memory.
    inputs = make_inputs(base, args.batch)
    trainers = {"vla_peft": Trainer(ours, inputs, device), "HF peft": Trainer(theirs, inputs, device)}
    for trainer in trainers.values():
        for _ in range(3):
            trainer.step()
    step = interleaved({k: t.step for k, t in trainers.items()}, args.steps, device, "training steps")
    memory = {name: trainer.memory_mib() for name, trainer in trainers.items()}

    # Forward latency at batch 1.
    one = {k: v.to(device) for k, v in make_inputs(base, 1).items() if k != "labels"}
    for model in (base, ours, theirs):
        model.eval()

    def forward(model):
        def run():
            with torch.no_grad():
                model(**one)

        return run

    variants = {"base": forward(base), "vla_peft unmerged": forward(ours), "HF peft unmerged": forward(theirs)}
    for run in variants.values():
        run()
    latency = interleaved(variants, args.forwards, device, "forwards (unmerged)")
    merge_lora(ours)
    theirs.base_model.merge_adapter()
    merged = {"base": forward(base), "vla_peft merged": forward(ours), "HF peft merged": forward(theirs)}
    latency_merged = interleaved(merged, args.forwards, device, "forwards (merged)")
    unmerge_lora(ours)
    theirs.base_model.unmerge_adapter()

    print(f"\nLoRA r={config.r} on {len(targets)} linears of the tiny LLaVA; device {device}, "
          f"{torch.get_num_threads()} thread(s), timed by {clock(device).__name__}; "
          f"training batch {args.batch}, seq {inputs['input_ids'].shape[1]}")
    header = f"{'median ms':>9} {'min ms':>9} {'x median':>8} {'x min':>8}"
    print(f"\n{'training step':<20} {header} {'memory MiB':>11}   (x = vs HF peft; target <= 1.0)")
    for name in trainers:
        print(row(name, step[name], step["HF peft"], f" {memory[name]:>11.2f}"))
    print(f"\n{'forward, batch 1':<20} {header}   (x = vs base run in the same block; target merged <= 1.02)")
    for table in (latency, latency_merged):
        for name, t in table.items():
            print(row(name, t, table["base"]))

if __name__ == "__main__":
    main()
