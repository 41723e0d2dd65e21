"""LoRA overhead on the tiny LLaVA: vla_peft beside HF peft, same process, same config.

    PYTHONPATH=. python bench/peft_overhead.py [--steps 30] [--forwards 200] [--batch 8] [--dropout 0.05] [--threads 1]

Prints training-step time and training memory for LoRA (ours vs peft), and forward latency
at batch 1 for the base, unmerged LoRA and merged LoRA (ours and peft), with ratios.
Targets (issue 21): our training step <= 0.9x peft's; unmerged forward <= 1.15x the base;
merged forward <= 1.02x the base. A third training row, the frozen base with no LoRA (forward and
backward to its input), is the part of a step both implementations share; the rest is LoRA's own.
Ours steps with the optimizer its training loop builds (fused AdamW); HF peft with torch's default
AdamW, as a hand-wired script does, and again with fused AdamW, so the table shows what that choice
is worth apart from LoRA itself.

Rows are interleaved and reported by bench/interleave.py (median, min, spread, per-round
ratios, a flag when the spread is too wide to trust). On the CPU there is no allocator peak to read, so "memory" is
what a training step holds beyond the frozen weights: tensors saved for backward (counted
once per storage) + gradients + AdamW state; on CUDA it is the allocator's peak.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import best_clock, interleave, ratio, table  # noqa: E402

from vla_peft import LoraConfig, inject, load_vlm, merge_lora, save_tiny_llava, unmerge_lora
from vla_peft.peft.lora import lora_layers  # noqa: E402
from vla_peft.train.loop import adamw  # noqa: E402


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
    """One model with its AdamW (``optimizer`` makes it); ``step`` runs forward, backward and the update."""

    def __init__(self, model, inputs, device, optimizer=torch.optim.AdamW):
        self.model = model.to(device).train()
        self.inputs = {k: v.to(device) for k, v in inputs.items()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer(self.params, lr=1e-4)
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


SHARED = "shared (no LoRA)"  # the row of the frozen base alone
FUSED = "HF peft, fused AdamW"


class SharedPart:
    """What every LoRA implementation's training step shares: the frozen base's forward and the
    backward through it to its input, with no LoRA at all. A step minus this is the implementation's
    own work (an upper bound on the shared part: it also takes the patch embedding's input gradient)."""

    def __init__(self, model, inputs, device):
        self.model = model.to(device).requires_grad_(False).train()
        self.inputs = {k: v.to(device) for k, v in inputs.items()}
        self.inputs["pixel_values"] = self.inputs["pixel_values"].clone().requires_grad_(True)  # not the others'

    def step(self) -> None:
        self.inputs["pixel_values"].grad = None
        self.model(**self.inputs).loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per contender")
    parser.add_argument("--forwards", type=int, default=200, help="timed batch-1 forwards per variant")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (its masks are a large part of a step)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps timings steady on a shared machine)")
    args = parser.parse_args()
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LoraConfig(r=args.r, alpha=2 * args.r, dropout=args.dropout)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llava(tmp)
        base = load_vlm(path)[0].to(device)
        ours = load_vlm(path)[0]
        inject(ours, config)
        targets = sorted(lora_layers(ours))
        peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)
        theirs = get_peft_model(load_vlm(path)[0], peft_config)
        theirs_fused = get_peft_model(load_vlm(path)[0], peft_config)

    # Training step: time and memory.
    inputs = make_inputs(base, args.batch)
    # Ours with the optimizer its training loop builds (fused AdamW); HF peft as a hand-wired script
    # builds it (torch's default AdamW) and, to show what that choice is worth, with fused AdamW too.
    trainers = {"vla_peft": Trainer(ours, inputs, device, adamw), "HF peft": Trainer(theirs, inputs, device),
                FUSED: Trainer(theirs_fused, inputs, device, partial(torch.optim.AdamW, fused=True)),
                SHARED: SharedPart(base, inputs, device)}
    for trainer in trainers.values():
        for _ in range(3):
            trainer.step()
    step = interleave({k: t.step for k, t in trainers.items()}, args.steps, progress="training steps")
    memory = {name: trainer.memory_mib() for name, trainer in trainers.items() if name not in (SHARED, FUSED)}

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
    latency = interleave(variants, args.forwards, warmup=3, progress="forwards (unmerged)")
    merge_lora(ours)
    theirs.base_model.merge_adapter()
    merged = {"base": forward(base), "vla_peft merged": forward(ours), "HF peft merged": forward(theirs)}
    latency_merged = interleave(merged, args.forwards, warmup=3, progress="forwards (merged)")
    unmerge_lora(ours)
    theirs.base_model.unmerge_adapter()

    print(f"\nLoRA r={config.r}, dropout {config.dropout} on {len(targets)} linears of the tiny LLaVA; device {device}, "
          f"{torch.get_num_threads()} thread(s), timed by {best_clock().__name__}; "
          f"training batch {args.batch}, seq {inputs['input_ids'].shape[1]}")
    print(f"\ntraining step, {args.steps} interleaved rounds (x = vs HF peft in the same round)")
    print(table(step, "HF peft", label="contender"))
    print("memory MiB (saved for backward + grads + AdamW state): "
          + ", ".join(f"{name} {mib:.2f}" for name, mib in memory.items()))
    shared = step[SHARED].median
    own = {name: step[name].median - shared for name in ("vla_peft", "HF peft", FUSED)}
    print("LoRA's own work per step (step - shared, medians): "
          + ", ".join(f"{name} {ms * 1e3:.2f} ms ({100 * ms / step[name].median:.1f} % of its step)" for name, ms in own.items())
          + f"; 0.9x HF peft's step needs vla_peft's own work <= {(0.9 * step['HF peft'].median - shared) * 1e3:.2f} ms")
    print(f"\nforward at batch 1, {args.forwards} interleaved rounds (x = vs the base in the same round)")
    print(table(latency, "base", label="unmerged"))
    print(table(latency_merged, "base", label="merged"))
    checks = [("training step <= 0.9x HF peft", ratio(step["vla_peft"], step["HF peft"]).median, 0.9),
              ("training step <= 0.9x HF peft with fused AdamW", ratio(step["vla_peft"], step[FUSED]).median, 0.9),
              ("unmerged forward <= 1.15x base", ratio(latency["vla_peft unmerged"], latency["base"]).median, 1.15),
              ("merged forward <= 1.02x base", ratio(latency_merged["vla_peft merged"], latency_merged["base"]).median, 1.02)]
    print()
    for name, value, limit in checks:
        print(f"target {name}: {value:.3f}x -> {'met' if value <= limit else 'NOT met'}")


if __name__ == "__main__":
    main()
