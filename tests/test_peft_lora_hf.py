"""Numerical equality with HF peft, and adapters moving both ways between peft and vla_peft."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft_inputs import randomise_lora, vlm_inputs

from vla_peft import LoraConfig, inject, load_adapter, load_vlm, save_adapter
from vla_peft.peft.lora import lora_layers

CONFIG = LoraConfig(r=4, alpha=12, dropout=0.0)  # default targets: both towers + projector


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def ours(tiny_llava_dir):
    model = load_vlm(tiny_llava_dir)[0]
    inject(model, CONFIG)
    randomise_lora(model, seed=3)
    return model


def peft_twin(tiny_llava_dir, model):
    """HF peft on a fresh copy of the same base, on the same modules, with our LoRA weights."""
    paths = sorted(lora_layers(model))
    config = PeftLoraConfig(r=CONFIG.r, lora_alpha=CONFIG.alpha, lora_dropout=0.0, target_modules=paths)
    twin = get_peft_model(load_vlm(tiny_llava_dir)[0], config)
    state = {}
    for path, layer in lora_layers(model).items():
        adapter = layer.adapters["default"]
        state[f"base_model.model.{path}.lora_A.default.weight"] = adapter.lora_A.weight
        state[f"base_model.model.{path}.lora_B.default.weight"] = adapter.lora_B.weight
    result = twin.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    return twin.eval()


def test_same_weights_same_logits_as_peft(tiny_llava_dir, ours):
    inputs = vlm_inputs(ours)
    twin = peft_twin(tiny_llava_dir, ours)
    base = logits(load_vlm(tiny_llava_dir)[0], inputs)
    ours_out = logits(ours, inputs)
    assert (ours_out - base).abs().max() > 1e-3, "the adapters must matter for the comparison to mean anything"
    torch.testing.assert_close(ours_out, logits(twin, inputs), rtol=0, atol=1e-5)


def test_same_loss_and_lora_gradients_as_peft(tiny_llava_dir, ours):
    """The training path (the update added into the base's fresh output in place) keeps autograd exact."""
    inputs = vlm_inputs(ours)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == ours.config.image_token_index, -100)
    twin = peft_twin(tiny_llava_dir, ours).train()
    losses = [model.train()(**inputs, labels=labels).loss for model in (ours, twin)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-5)
    theirs = dict(twin.named_parameters())
    for path, layer in lora_layers(ours).items():
        for x in "AB":
            grad = getattr(layer.adapters["default"], f"lora_{x}").weight.grad
            assert grad.abs().sum() > 0, (path, x)
            torch.testing.assert_close(grad, theirs[f"base_model.model.{path}.lora_{x}.default.weight"].grad,
                                       rtol=1e-4, atol=1e-6)


def test_our_export_loads_in_peft(tiny_llava_dir, ours, tmp_path):
    inputs = vlm_inputs(ours)
    save_adapter(ours, tmp_path / "ours")
    peft_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 4 and peft_config["lora_alpha"] == 12
    loaded = PeftModel.from_pretrained(load_vlm(tiny_llava_dir)[0], tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(ours, inputs), rtol=0, atol=1e-5)


def test_peft_saved_adapter_loads_in_ours(tiny_llava_dir, ours, tmp_path):
    inputs = vlm_inputs(ours)
    twin = peft_twin(tiny_llava_dir, ours)
    twin.save_pretrained(tmp_path / "peft")
    fresh = load_vlm(tiny_llava_dir)[0]
    report = load_adapter(fresh, tmp_path / "peft")
    assert report.trainable == sum(p.numel() for n, p in ours.named_parameters() if "lora_" in n)
    torch.testing.assert_close(logits(fresh, inputs), logits(twin, inputs), rtol=0, atol=1e-5)


def test_peft_adapter_with_unsupported_setting_is_refused(tiny_llava_dir, ours, tmp_path):
    twin = peft_twin(tiny_llava_dir, ours)
    twin.save_pretrained(tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(load_vlm(tiny_llava_dir)[0], tmp_path / "peft")
