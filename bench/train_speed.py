"""Training throughput and peak memory per PEFT method on the tiny VLM, beside a hand-wired
HF peft + transformers LoRA baseline, in one run.

    python bench/train_speed.py [--batch 16] [--rounds 12] [--steps 3] [--threads 1]

Each row runs in its own subprocess so that peak memory (max RSS on the CPU, max allocated
on a GPU) belongs to that row alone. The subprocesses stay up and take turns: each round asks
every row for ``--steps`` timed steps, one row after another (bench/interleave.py), so load from
other jobs hits all rows alike; the table gives median, min and spread of each row's seconds per
step and of its per-round ratio to hf-peft-lora, and flags rows too noisy to trust. On one thread
a step is timed by the worker thread's CPU time. Every row trains the same thing: two 64x64 cameras, an
instruction, a chunk of 8 four-dimensional actions, L1 loss, AdamW. Ours goes through
VLAPolicy (tensor preprocessing, one forward per chunk); the baseline is what a user wires
by hand: the LLaVA processor on PIL images in the loop, `peft.get_peft_model` with the same
LoRA rank and target modules, the built-in `input_ids` + `pixel_values` forward, and an MLP
on the last hidden state. `hf-peft-lora-pre` is the same with the processor run once before
timing, to separate the model's speed from the preprocessing's.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import best_clock, interleave_workers, ratio, serve, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ["lora", "qlora", "adapter", "prefix", "prompt"]
CHUNK, ACTION_DIM, IMAGE = 8, 4, 64


def batch_of(size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": torch.from_numpy(rng.random((size, 2, 1, 3, IMAGE, IMAGE), dtype=np.float32)),
        "state": torch.from_numpy(rng.standard_normal((size, 1, 5), dtype=np.float32)),
        "actions": torch.from_numpy(rng.uniform(-1, 1, (size, CHUNK, ACTION_DIM)).astype(np.float32)),
        "action_mask": torch.ones(size, CHUNK, dtype=torch.bool),
        "instruction": ["reach the red cube"] * size,
    }


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(method: str, base: Path, batch_size: int):
    from vla_peft.data.stats import Normalizer, compute_stats
    from vla_peft.peft.config import load_method_config
    from vla_peft.policy import PolicyConfig, VLAPolicy

    config = PolicyConfig(base=str(base), cameras=["agentview", "wrist"], image_size=IMAGE, state_dim=5,
                          chunk_size=CHUNK, action_dim=ACTION_DIM)
    stats = compute_stats(np.random.default_rng(0).uniform(-1, 1, (100, ACTION_DIM)))
    norms = {"actions": Normalizer(stats), "state": Normalizer(compute_stats(np.zeros((10, 5))), "none")}
    policy = VLAPolicy.from_config(config, load_method_config(REPO / "configs" / "peft" / f"{method}.yaml"), norms)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = batch_of(batch_size)

    def step():
        loss = policy(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def hf_peft_baseline(base: Path, batch_size: int, preprocess_in_loop: bool = True):
    import peft
    import yaml
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    lora = yaml.safe_load((REPO / "configs" / "peft" / "lora.yaml").read_text())
    roots = {"vision": r"model\.vision_tower\.vision_model\.", "projector": r"model\.multi_modal_projector\.",
             "language": r"model\.language_model\."}
    pattern = "|".join(f"{roots[scope]}(?:{p})" for scope, pats in lora["targets"].items() for p in pats)
    model = LlavaForConditionalGeneration.from_pretrained(base)
    processor = AutoProcessor.from_pretrained(base)
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                       lora_dropout=lora["dropout"], target_modules=pattern))
    hidden = model.config.text_config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(hidden, 256), torch.nn.GELU(), torch.nn.Linear(256, CHUNK * ACTION_DIM))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    batch = batch_of(batch_size)
    frames = (batch["images"][:, :, 0].permute(0, 1, 3, 4, 2).numpy() * 255).astype(np.uint8)
    prompt = "USER: <image>\n<image>\nwhat action should the robot take to reach the red cube? ASSISTANT:"

    def preprocess():
        images = [Image.fromarray(frame) for sample in frames for frame in sample]
        return processor(images=images, text=[prompt] * batch_size, return_tensors="pt", padding=True)

    ready = None if preprocess_in_loop else preprocess()

    def step():
        inputs = preprocess() if preprocess_in_loop else ready
        out = model(**inputs, output_hidden_states=True)
        actions = head(out.hidden_states[-1][:, -1]).view(batch_size, CHUNK, ACTION_DIM)
        loss = (actions - batch["actions"]).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def serve_one(name: str, base: Path, batch_size: int, threads: int | None) -> None:
    """A row's worker: build, warm up, then take turns with the other rows (interleave.serve)."""
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if name.startswith("hf-peft-lora"):
        step, trainable = hf_peft_baseline(base, batch_size, preprocess_in_loop=name == "hf-peft-lora")
    else:
        step, trainable = ours(name, base, batch_size)
    for _ in range(3):
        step()
    serve(step, lambda: {"trainable": trainable, "peak_mb": peak_memory_mb()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (default: 12)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row and round (default: 3)")
    parser.add_argument("--base", default=None, help="a base checkpoint (default: the tiny LLaVA, built here)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per row (default: 1, steady on a busy machine)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return serve_one(args.one, Path(args.base), args.batch, args.threads)
    names = ["hf-peft-lora", "hf-peft-lora-pre", *METHODS]
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base
        if base is None:
            from vla_peft.models import save_tiny_llava

            base = save_tiny_llava(Path(tmp) / "tiny", seed=0)
        commands = {name: [sys.executable, __file__, "--one", name, "--base", str(base), "--batch", str(args.batch),
                           "--threads", str(args.threads)] for name in names}
        times, results = interleave_workers(commands, args.rounds, args.steps)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} thread(s) per row, timed by {best_clock().__name__}"
    print(f"batch {args.batch}, {args.rounds} interleaved rounds x {args.steps} steps per row, {device}")
    print(table(times, "hf-peft-lora", unit="s", scale=1.0, label="method (s per step)"))
    print(f"\n{'method':<17} {'trainable':>10} {'samples/s':>10} {'vs hf-peft':>11} {'peak MB':>9}")
    for name in names:
        speedup = 1.0 / ratio(times[name], times["hf-peft-lora"]).median
        print(f"{name:<17} {results[name]['trainable']:>10,} {args.batch / times[name].median:>10.1f} {speedup:>10.2f}x "
              f"{results[name]['peak_mb']:>9.0f}")


if __name__ == "__main__":
    main()
