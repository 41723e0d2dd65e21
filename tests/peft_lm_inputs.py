"""Inputs and reference routines shared by the prefix and prompt tuning tests."""

from __future__ import annotations

import torch

PAD = 0  # the tiny tokenizer's <pad>


def image_prompt(model, text_ids: list[int], seed: int = 0) -> dict:
    """One LLaVA input: image placeholder tokens, then ``text_ids``, with a random image."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    ids = [config.image_token_id] * config.image_seq_length + text_ids
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.rand(1, 3, size, size, generator=generator),
    }


def padded(sequences: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` for ``sequences`` padded on ``side``."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq)
        mask[row, span] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, as ``generate`` computes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def greedy_without_cache(model, input_ids: torch.Tensor, steps: int, **inputs) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence each step: the reference that
    ``generate``'s cached decoding must reproduce."""
    ids = input_ids
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False, **inputs).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids


SEQUENCES = [[20, 31, 42, 53, 64, 75, 86], [101, 112, 123, 134]]
