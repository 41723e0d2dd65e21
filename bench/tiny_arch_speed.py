"""Training-step time of candidate tiny LLaVA shapes on this CPU, at the pretraining batch shape
(16 images x 4 question turns = ~70 text tokens per sequence).

Prints seconds per step and the ratio to the first row, all measured in one process so
that load from other work on the machine affects every row alike.
"""

from __future__ import annotations

import sys
import time

import torch

from vla_peft.models.tiny import TinyLlavaSpec, build_tiny_llava

CANDIDATES = {
    "64px p16 v128x2 t256x3 (chosen)": TinyLlavaSpec(),
    "64px p16 v128x2 t256x2": TinyLlavaSpec(text_layers=2),
    "64px p16 v128x3 t256x3": TinyLlavaSpec(vision_layers=3),
    "64px p16 v192x2 t256x3": TinyLlavaSpec(vision_hidden=192, vision_heads=6),
    "64px p8  v128x2 t256x3": TinyLlavaSpec(patch_size=8),
    "48px p8  v128x2 t256x3": TinyLlavaSpec(image_size=48, patch_size=8),
    "64px p16 v128x2 t384x3": TinyLlavaSpec(text_hidden=384, text_heads=6, text_kv_heads=6),
}


def step_time(spec: TinyLlavaSpec, batch: int = 16, text_len: int = 70, steps: int = 6) -> tuple[float, int]:
    model, tok = build_tiny_llava(0, spec)
    model.train()
    cfg = model.config
    n_img = (spec.image_size // spec.patch_size) ** 2
    ids = torch.randint(10, len(tok), (batch, n_img + text_len))
    ids[:, :n_img] = cfg.image_token_index
    pix = torch.randn(batch, 3, spec.image_size, spec.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, pixel_values=pix, labels=ids.masked_fill(ids == cfg.image_token_index, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2], sum(p.numel() for p in model.parameters())


def main() -> None:
    torch.set_flush_denormal(True)
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    step_time(TinyLlavaSpec(), steps=3)  # warm-up: the first model in a process pays one-time costs
    rows = [(name, *step_time(spec)) for name, spec in CANDIDATES.items()]
    base = rows[0][1]
    print(f"{'shape':<32} {'params':>9} {'s/step':>7} {'ratio':>6}   ({torch.get_num_threads()} threads)")
    for name, sec, params in rows:
        print(f"{name:<32} {params:>9,} {sec:>7.3f} {sec / base:>6.2f}")


if __name__ == "__main__":
    main()
