"""Adapters, prefix and prompt tuning beside the base and LoRA on the tiny LLaVA: trainable share,
batch-1 forward latency, greedy generate latency and a training step, each as a ratio to the
base measured in the same process (models measured in turns, so machine noise hits all alike).

    PYTHONPATH=. python bench/peft_methods.py [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from vla_peft import inject, load_method_config, load_vlm, save_tiny_llava

METHODS = {
    "base": None,
    "lora r8": {"method": "lora", "r": 8},
    "adapter m16": {"method": "adapter", "bottleneck": 16},
    "prefix m16": {"method": "prefix", "length": 16},
    "prefix m16 + MLP": {"method": "prefix", "length": 16, "reparameterize": True},
    "prompt m16": {"method": "prompt", "length": 16},
}


def inputs_for(model) -> dict:
    config = model.config
    size = config.vision_config.image_size
    ids = [config.image_token_id] * config.image_seq_length + list(range(20, 36))
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.rand(1, 3, size, size, generator=generator)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared CPU steadier)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llava(tmp, seed=0)
        models = {}
        shares = {}
        for name, config in METHODS.items():
            model, _ = load_vlm(path)
            if config is not None:
                report = inject(model, load_method_config(config))
                shares[name] = 100.0 * report.trainable / report.total
            else:
                shares[name] = 0.0
            models[name] = model
    inputs = inputs_for(models["base"])

    def forward(model):
        with torch.no_grad():
            model(**inputs)

    def generate(model):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)

    def train_step(model):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    probes = {"forward": forward, "generate 8": generate, "train step": train_step}
    times = {(name, probe): [] for name in models for probe in probes}
    for _ in range(args.repeats):
        for probe, fn in probes.items():
            for name, model in models.items():
                if probe == "train step" and name == "base":
                    continue  # nothing trains in the base; its step is timed with all weights trainable below
                times[name, probe].append(timed(lambda: fn(model)))
    full = models["base"]
    full.requires_grad_(True)
    for _ in range(args.repeats):
        times["base", "train step"].append(timed(lambda: train_step(full)))

    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"tiny LLaVA, batch 1, {inputs['input_ids'].shape[1]} tokens, median of {args.repeats}; "
          "ratios to the base (train step: to full fine-tuning)")
    print(f"{'method':<18} {'trainable %':>11} {'forward':>9} {'generate 8':>11} {'train step':>11}")
    for name in models:
        row = [median[name, probe] / median["base", probe] for probe in probes]
        print(f"{name:<18} {shares[name]:>10.3f}% " + " ".join(f"{r:>9.2f}x" for r in row)
              + f"   ({median[name, 'forward'] * 1e3:.1f} ms forward)")


if __name__ == "__main__":
    main()
