"""Bottleneck adapters on the tiny LLaVA: identity at init, placement, gradients, counts, config."""

from pathlib import Path

import pytest
import torch
from peft_lm_inputs import SEQUENCES, image_prompt

from vla_peft.models import load_vlm
from vla_peft.peft.adapter import AdapterConfig, BottleneckAdapter, inject_adapters
from vla_peft.peft.config import load_method_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "peft"
M = 8


def load(tiny_llava_dir, **config):
    model, _ = load_vlm(tiny_llava_dir)
    adapters = inject_adapters(model, AdapterConfig(bottleneck=M, **config))
    return model, adapters


def adapter_paths(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)]


def test_default_places_one_after_attention_out_and_one_after_mlp_in_every_layer(tiny_llava_dir):
    model, adapters = load(tiny_llava_dir)
    vision, text = model.config.vision_config, model.config.text_config
    expected = [
        f"model.vision_tower.encoder.layers.{i}.{where}.adapter"
        for i in range(vision.num_hidden_layers) for where in ("self_attn.out_proj", "mlp")
    ] + [
        f"model.language_model.layers.{i}.{where}.adapter"
        for i in range(text.num_hidden_layers) for where in ("self_attn.o_proj", "mlp")
    ]
    assert sorted(adapter_paths(model)) == sorted(expected)
    assert len(adapters) == len(expected)


def test_output_at_init_equals_base_and_base_weights_keep_their_names(tiny_llava_dir):
    base, _ = load_vlm(tiny_llava_dir)
    model, _ = load(tiny_llava_dir)
    inputs = image_prompt(model, SEQUENCES[0])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)
    assert set(base.state_dict()) <= set(model.state_dict())


def test_disabled_adapters_give_the_base_output(tiny_llava_dir):
    base, _ = load_vlm(tiny_llava_dir)
    model, adapters = load(tiny_llava_dir, activation="relu")
    inputs = image_prompt(model, SEQUENCES[0])
    with torch.no_grad():
        for adapter in adapters:
            adapter.up.weight.normal_(std=0.1)
        expected = base(**inputs).logits
        assert not torch.allclose(model(**inputs).logits, expected, atol=1e-4)
        for adapter in adapters:
            adapter.enabled = False
        assert torch.equal(model(**inputs).logits, expected)


def test_gradients_only_in_adapters_and_closed_form_counts(tiny_llava_dir):
    model, adapters = load(tiny_llava_dir)
    for adapter in adapters:
        d = adapter.up.out_features
        assert sum(p.numel() for p in adapter.parameters()) == 2 * d * M + d + M
    vision, text = model.config.vision_config, model.config.text_config
    widths = {vision.hidden_size: 2 * vision.num_hidden_layers, text.hidden_size: 2 * text.num_hidden_layers}  # 2 places a layer
    assert sorted(a.up.out_features for a in adapters) == sorted(w for w, n in widths.items() for _ in range(n))

    injected = {id(p) for adapter in adapters for p in adapter.parameters()}
    with torch.no_grad():  # away from the zero init, so every adapter weight receives a nonzero gradient
        for adapter in adapters:
            adapter.up.weight.normal_(std=0.1)
    model.train()
    model(**image_prompt(model, SEQUENCES[0])).logits.square().mean().backward()
    for name, param in model.named_parameters():
        if id(param) in injected:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


def test_layer_patterns_choose_where_adapters_go(tiny_llava_dir):
    model, adapters = load(tiny_llava_dir, targets={"language": [r"layers\.1\.mlp"]})
    assert adapter_paths(model) == ["model.language_model.layers.1.mlp.adapter"]
    with pytest.raises(ValueError, match="once per model"):
        inject_adapters(model, AdapterConfig(targets={"language": [r"layers\.1\.mlp"]}))


def test_pattern_matching_nothing_names_nearest_modules(tiny_llava_dir):
    model, _ = load_vlm(tiny_llava_dir)
    with pytest.raises(ValueError, match=r"matches no .*layers\.0\.mlp"):
        inject_adapters(model, AdapterConfig(targets={"language": [r"layers\.0\.mpl"]}))


@pytest.mark.slow  # loading the NF4 base takes seconds on the CPU
def test_adapters_in_a_4bit_base_train_in_float32(tiny_llava_dir):
    pytest.importorskip("bitsandbytes")
    model, _ = load_vlm(tiny_llava_dir, load_in_4bit=True)
    adapters = inject_adapters(model, AdapterConfig(bottleneck=M))
    assert all(p.dtype == torch.float32 for a in adapters for p in a.parameters())
    model(**image_prompt(model, SEQUENCES[0])).logits.mean().backward()
    assert all(a.up.weight.grad is not None for a in adapters)


@pytest.mark.parametrize(
    "bad, field",
    [({"bottleneck": 0}, "bottleneck"), ({"bottleneck": True}, "bottleneck"), ({"activation": "tanh"}, "activation"),
     ({"targets": {"audio": ["x"]}}, "scope"), ({"targets": {"language": "mlp"}}, "targets")],
)
def test_bad_config_names_the_problem(bad, field):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**bad)


def test_yaml_config_loads_with_overrides():
    config = load_method_config(CONFIGS / "adapter.yaml", {"bottleneck": 32})
    assert isinstance(config, AdapterConfig) and config.bottleneck == 32
    assert config.targets == AdapterConfig().targets


def test_saves_and_loads_through_the_public_api(tiny_llava_dir, tmp_path):
    """inject -> save_adapter -> load_adapter onto a fresh base gives the same outputs;
    set_peft_enabled(False) gives the base's."""
    from vla_peft import inject, load_adapter, save_adapter, set_peft_enabled

    base, _ = load_vlm(tiny_llava_dir)
    model, _ = load_vlm(tiny_llava_dir)
    inject(model, AdapterConfig(bottleneck=M))
    with torch.no_grad():  # move off the initial values so the round trip has something to carry
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    inputs = image_prompt(model, SEQUENCES[0])
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = load_vlm(tiny_llava_dir)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(fresh(**inputs).logits, expected)
        set_peft_enabled(fresh, False)
        assert torch.equal(fresh(**inputs).logits, base(**inputs).logits)
