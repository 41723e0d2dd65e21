"""Load any LLaVA-style checkpoint that transformers loads, in full precision or 4-bit NF4."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor, BitsAndBytesConfig, LlavaForConditionalGeneration

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def nf4_config(compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    """QLoRA's quantisation: NF4 weights with double-quantised scales."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_vlm(
    name_or_path: str | Path,
    *,
    dtype: str = "float32",
    load_in_4bit: bool = False,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
):
    """Return ``(model, processor)`` for a local checkpoint directory or a hub name.

    ``processor`` is None when the checkpoint ships none. The model comes back in
    eval mode with every parameter frozen: PEFT injection decides what trains.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    path = Path(name_or_path)
    looks_local = path.is_absolute() or str(name_or_path).startswith(".") or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a directory with config.json "
            "(build the tiny base with `vla-peft pretrain-base` or pass a hub name such as llava-hf/llava-1.5-7b-hf)"
        )
    kwargs: dict = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        kwargs["quantization_config"] = nf4_config(DTYPES[dtype])
        kwargs["device_map"] = device_map or ("cuda" if torch.cuda.is_available() else "cpu")
    elif device_map is not None:
        kwargs["device_map"] = device_map
    model = LlavaForConditionalGeneration.from_pretrained(name_or_path, **kwargs)
    model.eval()
    model.requires_grad_(False)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        processor = None
    return model, processor
