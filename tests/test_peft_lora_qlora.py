"""QLoRA on the CPU: LoRA over bitsandbytes NF4 linears with double quantisation."""

from pathlib import Path

import pytest
import torch
from peft_inputs import randomise_lora, vlm_inputs

from vla_peft import inject, load_method_config, load_vlm, merge_lora, merged_copy
from vla_peft.peft.lora import is_4bit, lora_layers

QLORA = load_method_config(Path(__file__).parents[1] / "configs/peft/qlora.yaml", {"r": 4, "dropout": 0.0})


@pytest.fixture
def qmodel(tiny_llava_dir):
    return load_vlm(tiny_llava_dir, load_in_4bit=QLORA.load_in_4bit)[0]


def test_targets_are_nf4_double_quant(qmodel):
    import bitsandbytes as bnb

    inject(qmodel, QLORA)
    layers = lora_layers(qmodel)
    n_vision, n_text = qmodel.config.vision_config.num_hidden_layers, qmodel.config.text_config.num_hidden_layers
    assert len(layers) == n_vision * 6 + 2 + n_text * 7  # qlora.yaml: attention + MLP of both towers, projector
    for layer in layers.values():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert layer.base_layer.weight.quant_type == "nf4"
        assert layer.base_layer.weight.quant_state.nested  # double quantisation of the scales


@pytest.mark.slow  # seconds alone, but 20 steps of 4-bit training; under load far more
def test_lora_over_nf4_trains_with_gradients_only_in_lora(qmodel):
    torch.manual_seed(0)  # the LoRA init draws from the global generator: not from whatever ran before
    inject(qmodel, QLORA)
    inputs = vlm_inputs(qmodel, batch=2)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == qmodel.config.image_token_index, -100)
    params = [p for p in qmodel.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    qmodel.train()
    losses = []
    for step in range(20):
        loss = qmodel(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in qmodel.named_parameters():
                if "lora_" in name:
                    assert p.grad is not None, name
                else:
                    assert p.grad is None, name
        optimizer.step()
        losses.append(loss.item())
    print(f"QLoRA toy loss: {losses[0]:.3f} -> {losses[-1]:.3f} over 20 steps")
    assert losses[-1] < 0.7 * losses[0], losses


def test_merge_into_nf4_is_refused_and_merged_copy_is_exact(qmodel):
    inject(qmodel, QLORA)
    randomise_lora(qmodel)
    inputs = vlm_inputs(qmodel)
    with torch.no_grad():
        qmodel(**inputs)  # on a CPU with AVX512-BF16, bitsandbytes repacks the NF4 weights for its kernel here
    with pytest.raises(ValueError, match="merged_copy"):
        merge_lora(qmodel)
    copy = merged_copy(qmodel)
    assert not any(type(m).__name__ in ("Linear4bit", "LoraLinear") for m in copy.modules())
    assert not hasattr(copy.config, "quantization_config")
    for module in qmodel.modules():  # the reference: the 4-bit forward that dequantises (that kernel computes in bfloat16)
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        torch.testing.assert_close(copy(**inputs).logits, qmodel(**inputs).logits, rtol=0, atol=1e-5)


def test_qlora_config_on_full_precision_base_is_refused(tiny_llava_dir):
    with pytest.raises(ValueError, match="load_in_4bit=True"):
        inject(load_vlm(tiny_llava_dir)[0], QLORA)
