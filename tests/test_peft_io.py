"""Adapter directories: round trip, base fingerprint, damaged files, atomic writes."""

import json
from dataclasses import dataclass

import pytest
import torch
from peft_inputs import randomise_lora, vlm_inputs
from torch import nn

from vla_peft import LoraConfig, TinyLlavaSpec, inject, load_adapter, load_vlm, save_adapter, save_tiny_llava
from vla_peft.peft import MethodConfig, PeftModule, io, register
from vla_peft.peft.inject import INJECTORS


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def saved(tiny_llava_dir, tmp_path):
    """A LoRA adapter with non-zero weights saved to disk, and the logits it gives."""
    model = load_vlm(tiny_llava_dir)[0]
    inject(model, LoraConfig(r=4, use_rslora=True))
    randomise_lora(model)
    path = save_adapter(model, tmp_path / "adapter")
    return path, logits(model, vlm_inputs(model))


def test_round_trip_gives_same_logits(tiny_llava_dir, saved):
    path, expected = saved
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "vla_peft.json"]
    model = load_vlm(tiny_llava_dir)[0]
    load_adapter(model, path, adapter_name="task")
    assert model.peft_config_vla["task"].use_rslora
    torch.testing.assert_close(logits(model, vlm_inputs(model)), expected, rtol=0, atol=0)


def test_fingerprint_records_base_and_target_shapes(saved):
    fingerprint = json.loads((saved[0] / "vla_peft.json").read_text())["fingerprint"]
    assert fingerprint["architecture"] == "LlavaForConditionalGeneration"
    assert fingerprint["text"]["hidden_size"] == 256
    assert fingerprint["targets"]["model.multi_modal_projector.linear_1"] == [256, 128]


def test_loading_onto_a_different_base_fails_clearly(saved, tmp_path):
    other_dir = save_tiny_llava(tmp_path / "other", spec=TinyLlavaSpec(text_hidden=128))
    other = load_vlm(other_dir)[0]
    with pytest.raises(ValueError, match=r"different base model .*hidden_size.* onto the base it was trained on"):
        load_adapter(other, saved[0])
    assert not hasattr(other, "peft_config_vla"), "a refused adapter must leave the model untouched"


def test_target_shape_mismatch_fails_clearly(tiny_llava_dir, saved):
    # Tower sizes agree but a target's shape does not (as on a base with another projector).
    ours = json.loads((saved[0] / "vla_peft.json").read_text())
    ours["fingerprint"]["targets"]["model.multi_modal_projector.linear_1"] = [256, 64]
    (saved[0] / "vla_peft.json").write_text(json.dumps(ours))
    model = load_vlm(tiny_llava_dir)[0]
    with pytest.raises(ValueError, match=r"shape differences: model.multi_modal_projector.linear_1 \[256, 64\] vs \[256, 128\]"):
        load_adapter(model, saved[0])
    assert not hasattr(model, "peft_config_vla")


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_safetensors_fails_clearly(tiny_llava_dir, saved, keep):
    weights = saved[0] / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(load_vlm(tiny_llava_dir)[0], saved[0])


def test_save_is_atomic(tiny_llava_dir, saved, monkeypatch):
    path, _ = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    model = load_vlm(tiny_llava_dir)[0]
    inject(model, LoraConfig(r=2))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before, "the old adapter must survive"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == [], "no temp dir left behind"


def test_peft_layout_without_our_fingerprint_still_checks_shapes(saved, tmp_path):
    (saved[0] / "vla_peft.json").unlink()  # as HF peft would have written it
    other = load_vlm(save_tiny_llava(tmp_path / "other", spec=TinyLlavaSpec(text_hidden=128)))[0]
    with pytest.raises(ValueError, match=r"different base model .*shape differences"):
        load_adapter(other, saved[0])


# The generic format, shown with a toy method whose module adds a learned bias after the
# projector (the real non-LoRA methods bring their own tests).


@register
@dataclass
class ToyConfig(MethodConfig):
    method = "toy"
    size: int = 256


class ToyBias(PeftModule):
    def __init__(self, size):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))

    def hook(self, module, args, output):
        return output + self.bias if self.enabled else output


def inject_toy(model, config):
    toy = ToyBias(config.size)
    projector = model.model.multi_modal_projector
    projector.toy = toy
    projector.linear_2.register_forward_hook(toy.hook)
    return [toy]


def test_generic_format_round_trip(tiny_llava_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(INJECTORS, "toy", (__name__, "inject_toy"))
    model = load_vlm(tiny_llava_dir)[0]
    report = inject(model, ToyConfig())
    assert report.rows["projector"][0] == 256
    with torch.no_grad():
        model.model.multi_modal_projector.toy.bias.normal_()
    expected = logits(model, vlm_inputs(model))
    path = save_adapter(model, tmp_path / "toy")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_model.safetensors", "vla_peft.json"]
    fresh = load_vlm(tiny_llava_dir)[0]
    load_adapter(fresh, path)
    torch.testing.assert_close(logits(fresh, vlm_inputs(fresh)), expected, rtol=0, atol=0)
