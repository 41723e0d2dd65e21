"""A tiny LLaVA built from a config, for CPU tests and the CPU demo.

It is written with ``save_pretrained`` and read back through the same
``from_pretrained`` path a real checkpoint takes, so nothing downstream knows the
difference. Weights, tokenizer and image processor follow from the seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

# OpenVLA's prompt: the policy's default, and one of the tiny base's pretraining questions.
ACTION_PROMPT = "what action should the robot take to {instruction}?"

# Words the robot tasks and the pretraining questions use, so that they become
# single tokens; anything else still tokenises byte by byte.
_DOMAIN_TEXT = """
pick up the red green blue yellow purple orange cyan white black cube ball block pad
and put it on place push move reach to touch stack onto top of left right front back
behind near far above below center middle table gripper open closed robot arm hand
what where which colour color is are how many there yes no one two three four five
six seven eight nine zero bin x y z position object target goal instruction task
In: Out: USER: ASSISTANT: Q: A: what action should the robot take to ?
where is which part of the image in describe scene from left to right how many cubes pads
is there a colour ? where in the image is the ? which is the ? what colour is ? how many ?
describe the scene ? is the gripper open ? bottom leftmost rightmost yes no
which
how
what
is
describe
reach
push
stack
pick
move
put
"""


@dataclass
class TinyLlavaSpec:
    """Sizes of the tiny LLaVA; the defaults were chosen for 2 CPU cores."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 4
    vocab_size: int = 640
    max_positions: int = 512


def build_tokenizer(vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer trained on the task vocabulary."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_DOMAIN_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def tiny_llava_config(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    num_patches = (spec.image_size // spec.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=num_patches,
        # The last CLIP layer is used (the default -2 would leave it without gradient).
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def build_tiny_llava(seed: int = 0, spec: TinyLlavaSpec | None = None):
    """Return ``(model, tokenizer)``: a randomly initialised tiny LLaVA, same seed same weights."""
    spec = spec or TinyLlavaSpec()
    tokenizer = build_tokenizer(spec.vocab_size)
    config = tiny_llava_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.eval()
    return model, tokenizer


def save_tiny_llava(path: str | Path, seed: int = 0, spec: TinyLlavaSpec | None = None) -> Path:
    """Build the tiny LLaVA and write it as a normal transformers checkpoint directory."""
    from vla_peft.models.processor import save_processor

    path = Path(path)
    model, tokenizer = build_tiny_llava(seed, spec)
    model.save_pretrained(path)
    save_processor(path, tokenizer, model.config)
    return path
