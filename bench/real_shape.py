"""LoRA and QLoRA training on a LLaVA of real shape (random weights), ours beside hand-wired HF peft:
peak memory against what it should be (weights + trainable state + activations) and step time.

    PYTHONPATH=. python bench/real_shape.py [--dtype bfloat16] [--text-layers 22] [--vision-layers 24]
                                            [--rounds 2] [--steps 1] [--threads 1]

The base is built from config: a CLIP ViT-L/14-336 vision tower (1024 wide, 24 layers, 576 patches)
and a TinyLlama-1.1B-shaped language model (2048 wide, 22 layers, 32 heads / 4 KV heads, MLP 5632,
vocabulary 32000), saved once and loaded by each row through ``from_pretrained`` (QLoRA: NF4 with
double quantisation, as ``vla_peft.load_vlm(load_in_4bit=True)`` loads it). Fewer layers keep
every width real and scale memory and time per layer linearly; the CPU run here uses 2 + 2 layers
in float32 (this CPU's bfloat16 matmul ran at 10 GFLOP/s against 70 in float32).

Each row (ours / HF peft x LoRA / QLoRA) is one subprocess kept up between rounds (bench/interleave.py):
same LoRA rank, alpha and target modules (our default targets), batch 1 (one 336x336 image and a
short instruction, 608 tokens), labels on the text, AdamW. Memory on the CPU is the process's peak
resident set during the training steps (VmHWM, reset after loading), on CUDA the allocator's peak;
"expected" is the process before the model + the weights + the trainable state (parameters,
gradients, AdamW moments) + the activations saved for backward (counted once per storage).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import best_clock, interleave_workers, ratio, serve, table  # noqa: E402

ROWS = ["ours LoRA", "HF peft LoRA", "ours QLoRA", "HF peft QLoRA"]
RANK, ALPHA, TEXT_TOKENS = 16, 32, 32


def build_base(path: Path, dtype: torch.dtype, text_layers: int, vision_layers: int) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=text_layers,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999,
                         vision_feature_layer=-1 if vision_layers < 2 else -2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype)
    model.save_pretrained(path)
    return path


def inputs_for(config, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    text = torch.randint(5, 31000, (1, TEXT_TOKENS), generator=g)
    ids = torch.cat([text[:, :2], torch.full((1, n_image), config.image_token_index), text[:, 2:]], dim=1)
    size = config.vision_config.image_size
    return {"input_ids": ids.to(device), "pixel_values": torch.randn(1, 3, size, size, generator=g).to(device),
            "labels": ids.masked_fill(ids == config.image_token_index, -100).to(device)}


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def storages_mb(tensors) -> float:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2**20


def load_row(name: str, base: Path, dtype: torch.dtype):
    """The model of row ``name``: ours through vla_peft, or peft wired by hand on the same targets."""
    from vla_peft import LoraConfig, inject, load_vlm
    from vla_peft.models.load import nf4_config
    from vla_peft.peft.base import find_targets
    from vla_peft.peft.lora import is_linear

    qlora = "QLoRA" in name
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    config = LoraConfig(r=RANK, alpha=ALPHA, load_in_4bit=qlora)
    if name.startswith("ours"):
        model, _ = load_vlm(base, dtype=dtype_name, load_in_4bit=qlora)
        inject(model, config)
        return model
    import peft
    from transformers import LlavaForConditionalGeneration

    kwargs = {"dtype": dtype}
    if qlora:
        kwargs.update(quantization_config=nf4_config(dtype), device_map="cuda" if torch.cuda.is_available() else "cpu")
    model = LlavaForConditionalGeneration.from_pretrained(base, **kwargs)
    targets = sorted(t.path for t in find_targets(model, config.targets, accept=is_linear, kind="linear"))
    return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))


def run_row(name: str, base: Path, dtype: torch.dtype, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import peft  # noqa: F401  (every library a row uses, imported before the process's size is taken)
    import transformers  # noqa: F401

    import vla_peft  # noqa: F401
    if "QLoRA" in name:
        import bitsandbytes  # noqa: F401
    before_model = rss_mb()
    model = load_row(name, base, dtype)
    if "QLoRA" not in name:
        model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs = inputs_for(model.config, device)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step(count_saved: bool = False) -> None:
        if count_saved:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(**inputs).loss
        else:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    load_peak = rss_mb("VmHWM")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak: training's, not loading's
    step(count_saved=True)  # warm-up, and the activations' count
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    activations = sum(n for ptr, n in saved.items() if ptr not in weights) / 2**20
    state = storages_mb(params) * 2 + sum(storages_mb([t for t in s.values() if torch.is_tensor(t) and t.dim()])
                                          for s in optimizer.state.values())

    def report() -> dict:
        if device.type == "cuda":
            peak, process = torch.cuda.max_memory_allocated() / 2**20, 0.0
        else:
            peak, process = rss_mb("VmHWM"), before_model
        return {"peak": peak, "process": process, "load_peak": load_peak, "activations": activations,
                "weights": storages_mb([*model.parameters(), *model.buffers()]), "state": state,
                "trainable": sum(p.numel() for p in params)}

    serve(step, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--text-layers", type=int, default=22)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row and round (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per row (default: 1)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if args.row:
        return run_row(args.row, Path(args.base), dtype, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(Path(tmp) / "base", dtype, args.text_layers, args.vision_layers)
        commands = {name: [sys.executable, __file__, "--row", name, "--base", str(base), "--dtype", args.dtype,
                           "--threads", str(args.threads)] for name in ROWS}
        times, results = interleave_workers(commands, args.rounds, args.steps)
    torch.set_num_threads(args.threads)
    where = "cuda (allocator peak)" if torch.cuda.is_available() else \
        f"cpu, {args.threads} thread(s), peak RSS, timed by {best_clock().__name__}"
    print(f"real-shape LLaVA (CLIP ViT-L/14-336 x {args.vision_layers} layers + 1.1B-shaped Llama x {args.text_layers} "
          f"layers), {args.dtype}, batch 1, {TEXT_TOKENS + 576} tokens, LoRA r={RANK}; {where}")
    print(f"\n{'row':<15} {'trainable':>11} {'weights':>9} {'state':>7} {'activ.':>8} {'process':>8} {'expected':>9} "
          f"{'peak MB':>8} {'peak-exp':>9} {'vs peft':>8} {'load peak':>10}")
    for name, r in results.items():
        expected = r["process"] + r["weights"] + r["state"] + r["activations"]
        peft_peak = results[name.replace("ours", "HF peft")]["peak"]
        print(f"{name:<15} {r['trainable']:>11,} {r['weights']:>9.0f} {r['state']:>7.0f} {r['activations']:>8.0f} "
              f"{r['process']:>8.0f} {expected:>9.0f} {r['peak']:>8.0f} {r['peak'] - expected:>9.0f} "
              f"{r['peak'] / peft_peak:>7.3f}x {r['load_peak']:>10.0f}")
    print(f"\nstep time, {args.rounds} interleaved rounds x {args.steps} step(s) (x = vs HF peft LoRA in the same round)")
    print(table(times, "HF peft LoRA", unit="s", scale=1.0, label="row (s per step)"))
    for method in ("LoRA", "QLoRA"):
        ours, theirs = results[f"ours {method}"]["peak"], results[f"HF peft {method}"]["peak"]
        step = ratio(times[f"ours {method}"], times[f"HF peft {method}"]).median
        print(f"target {method}: ours within 5 % of peft's memory: {ours / theirs:.3f}x -> "
              f"{'met' if ours <= 1.05 * theirs else 'NOT met'}; step time {step:.3f}x peft's")


if __name__ == "__main__":
    main()
