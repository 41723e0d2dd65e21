"""Inputs and reference routines shared by the prefix and prompt tuning tests."""

from __future__ import annotations

import inspect

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


def greedy_without_cache(model, input_ids: torch.Tensor, steps: int, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by re-running the whole sequence each step: the reference that
    ``generate``'s cached decoding must reproduce. Returns the ids and each step's logits."""
    ids, step_logits = input_ids, []
    mask = inputs.pop("attention_mask", torch.ones_like(input_ids))
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False, **inputs)
        logits = logits.logits[:, -1]
        step_logits.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return ids, torch.stack(step_logits, dim=1)


def assert_generate_matches_reference(model, inputs: dict, steps: int = 4) -> None:
    """``generate`` (cached, greedy) gives the uncached reference's tokens and logits, twice."""
    runs = [
        model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                       return_dict_in_generate=True)
        for _ in range(2)
    ]
    extra = {k: v for k, v in inputs.items() if k != "input_ids"}
    ref_ids, ref_logits = greedy_without_cache(model, inputs["input_ids"], steps, **extra)
    produced = runs[0].sequences
    new = produced.shape[1] - inputs["input_ids"].shape[1]
    assert new > 0
    assert torch.equal(produced, runs[1].sequences)  # deterministic
    assert torch.equal(produced, ref_ids[:, : produced.shape[1]])
    torch.testing.assert_close(torch.stack(runs[0].logits, dim=1), ref_logits[:, :new], atol=1e-4, rtol=0)


SEQUENCES = [[20, 31, 42, 53, 64, 75, 86], [101, 112, 123, 134]]


def lm_of(model):
    return model.model.language_model


def cache_key(lm) -> str:
    """The KV-cache argument's name: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
