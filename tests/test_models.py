import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit

from vla_peft.models import build_tiny_llava, load_vlm


def test_tiny_llava_is_deterministic_and_round_trips(tiny_llava_dir):
    model, _ = build_tiny_llava(seed=0)
    loaded, processor = load_vlm(tiny_llava_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in loaded.parameters())
    other, _ = build_tiny_llava(seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    inputs = processor(images=[image], text=["USER: <image>\npick up the red cube ASSISTANT:"], return_tensors="pt")
    n_patches = (64 // 16) ** 2
    assert int((inputs["input_ids"] == loaded.config.image_token_index).sum()) == n_patches
    with torch.no_grad():
        logits = loaded(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], loaded.config.text_config.vocab_size)


def test_nf4_load_quantises_the_linears(tiny_llava_dir):
    model, _ = load_vlm(tiny_llava_dir, load_in_4bit=True)
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit)
    assert q_proj.weight.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantisation


def test_missing_checkpoint_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_vlm(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype"):
        load_vlm(tmp_path, dtype="float8")
