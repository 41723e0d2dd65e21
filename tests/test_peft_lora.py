"""LoRA layers: identity at init, merge/unmerge, gradients and counts, named adapters."""

import math

import pytest
import torch
from peft_inputs import randomise_lora, vlm_inputs
from torch import nn

from vla_peft import (
    LoraConfig,
    inject,
    load_vlm,
    merge_lora,
    save_adapter,
    set_active_adapter,
    set_peft_enabled,
    unmerge_lora,
)
from vla_peft.peft.lora import ActiveAdapter, LoraLinear, lora_layers


@pytest.fixture
def model(tiny_llava_dir):
    return load_vlm(tiny_llava_dir)[0]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_lora_at_init_equals_base(model):
    inputs = vlm_inputs(model)
    before = logits(model, inputs)
    inject(model, LoraConfig(r=4, dropout=0.0))
    assert lora_layers(model), "nothing was wrapped"
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=0)
    for layer in lora_layers(model).values():
        adapter = layer.adapters["default"]
        assert torch.count_nonzero(adapter.lora_B.weight) == 0
        assert torch.count_nonzero(adapter.lora_A.weight) > 0
        bound = 1 / math.sqrt(layer.base_layer.in_features)  # kaiming_uniform(a=sqrt(5)) bound
        assert adapter.lora_A.weight.abs().max() <= bound


def test_default_targets_cover_both_towers_and_projector(model):
    inject(model, LoraConfig())
    paths = set(lora_layers(model))
    assert "model.vision_tower.encoder.layers.0.self_attn.out_proj" in paths
    assert "model.language_model.layers.1.self_attn.o_proj" in paths
    assert {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"} <= paths
    n_vision, n_text = model.config.vision_config.num_hidden_layers, model.config.text_config.num_hidden_layers
    assert len(paths) == n_vision * 4 + 2 + n_text * 4


def test_all_linears_of_a_scope_by_pattern(model):
    inject(model, LoraConfig(targets={"projector": [".*"], "language": [r"layers\.0\..*"]}))
    assert set(lora_layers(model)) == {
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
        *(f"model.language_model.layers.0.self_attn.{p}_proj" for p in "qkvo"),
        *(f"model.language_model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")),
    }


def test_scaling_plain_and_rslora():
    assert LoraConfig(r=4, alpha=8).scaling == 2.0
    assert LoraConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_merge_matches_unmerged_and_unmerge_restores_base(model):
    inputs = vlm_inputs(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, LoraConfig(r=8, alpha=16))
    randomise_lora(model)
    unmerged = logits(model, inputs)
    assert (unmerged - logits_base(model, inputs)).abs().max() > 1e-3, "adapters must change the output"
    merge_lora(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, rtol=0, atol=1e-5)
    unmerge_lora(model)
    for name, p in model.named_parameters():
        original = name.replace(".base_layer", "")
        if original in base_weights:
            torch.testing.assert_close(p, base_weights[original], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, inputs), unmerged, rtol=0, atol=1e-5)


def logits_base(model, inputs):
    set_peft_enabled(model, False)
    try:
        return logits(model, inputs)
    finally:
        set_peft_enabled(model, True)


def test_merged_model_is_the_plain_base_architecture(model, tmp_path):
    base_keys = set(model.state_dict())
    inject(model, LoraConfig(r=2))
    n_lora_layers = len(lora_layers(model))
    inject(model, LoraConfig(r=2), adapter_name="other")
    merge_lora(model)
    assert not lora_layers(model) and set(model.state_dict()) == base_keys
    for action in (
        lambda: set_active_adapter(model, "default"),
        lambda: set_peft_enabled(model, False),
        lambda: inject(model, LoraConfig(r=2), adapter_name="third"),
        lambda: save_adapter(model, tmp_path / "a"),
        lambda: merge_lora(model),
    ):
        with pytest.raises(RuntimeError, match=r"call unmerge_lora\(model\) first"):
            action()
    unmerge_lora(model)
    assert len(lora_layers(model)) == n_lora_layers


def test_switching_away_from_a_layer_merged_adapter_is_refused():
    layer = LoraLinear(nn.Linear(8, 8), ActiveAdapter("a"))
    layer.add_adapter("a", LoraConfig(r=2))
    layer.add_adapter("b", LoraConfig(r=2))
    layer.merge("a")
    layer(torch.randn(1, 8))
    layer.active.name = "b"
    with pytest.raises(RuntimeError, match="'a' is merged into the base weights"):
        layer(torch.randn(1, 8))


def test_backward_reaches_only_lora_and_counts_match_closed_form(model):
    config = LoraConfig(r=4)
    report = inject(model, config)
    randomise_lora(model)  # B = 0 would leave A without gradient
    out = model(**vlm_inputs(model), labels=vlm_inputs(model)["input_ids"])
    out.loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    expected = 0
    for layer in lora_layers(model).values():
        d_in, d_out = layer.base_layer.in_features, layer.base_layer.out_features
        count = sum(p.numel() for p in layer.adapters.parameters())
        assert count == config.r * (d_in + d_out)
        expected += count
    assert report.trainable == expected


def test_named_adapters_switch_through_one_shared_attribute(model):
    inputs = vlm_inputs(model)
    base = logits(model, inputs)
    inject(model, LoraConfig(r=2))
    randomise_lora(model, seed=1)
    out_default = logits(model, inputs)
    inject(model, LoraConfig(r=4, targets={"language": [r"layers\.\d+\.self_attn\.q_proj"]}), adapter_name="task2")
    layers = list(lora_layers(model).values())
    assert len({id(layer.active) for layer in layers}) == 1, "all layers must share one holder"
    with torch.no_grad():
        for layer in layers:
            if "task2" in layer.adapters:
                nn.init.normal_(layer.adapters["task2"].lora_B.weight, std=0.05)
    assert model.lora_active_adapter.name == "task2"  # a newly injected adapter is the active one
    out_task2 = logits(model, inputs)
    assert (out_task2 - out_default).abs().max() > 1e-3
    # Switching is one attribute assignment on the shared holder.
    model.lora_active_adapter.name = "default"
    torch.testing.assert_close(logits(model, inputs), out_default, rtol=0, atol=0)
    set_active_adapter(model, "task2")
    torch.testing.assert_close(logits(model, inputs), out_task2, rtol=0, atol=0)
    set_active_adapter(model, None)
    torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        set_active_adapter(model, "nope")


def test_second_adapter_is_the_only_trainable_one(model):
    inject(model, LoraConfig(r=2))
    report = inject(model, LoraConfig(r=2, targets={"projector": ["linear_1"]}), adapter_name="b")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.b." in n for n in trainable)
    assert report.trainable == 2 * (128 + 256)


def test_adapters_added_to_an_eval_model_are_in_eval(model):
    """A bank adds adapters to an eval-mode base: their dropout must stay off, without a model-wide .eval()."""
    model.eval()
    inject(model, LoraConfig(r=4, dropout=0.5))
    inject(model, LoraConfig(r=4, dropout=0.5), adapter_name="b")
    randomise_lora(model)
    assert not any(m.training for m in model.modules())
    inputs = vlm_inputs(model)
    torch.testing.assert_close(logits(model, inputs), logits(model, inputs), rtol=0, atol=0)


def test_disable_gives_base_output(model):
    inputs = vlm_inputs(model)
    base = logits(model, inputs)
    inject(model, LoraConfig(r=4))
    randomise_lora(model)
    set_peft_enabled(model, False)
    torch.testing.assert_close(logits(model, inputs), base, rtol=0, atol=0)
    set_peft_enabled(model, True)
    assert (logits(model, inputs) - base).abs().max() > 1e-3


def test_wrapper_keeps_the_linear_interface(model):
    inject(model, LoraConfig(r=2))
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and q.weight is q.base_layer.weight and q.bias is None


def test_dropout_drops_each_input_with_its_probability_and_keeps_the_mean():
    """LoRA's dropout cuts 64-bit random words into four 16-bit draws: every lane of the word must
    drop at the configured rate (a sign bit that random_ never sets would make one lane drop
    nothing), and the kept inputs' 1/(1-p) must leave the update's mean where dropout 0 puts it."""
    from vla_peft.peft.lora import LoraAdapter, keep_mask

    torch.manual_seed(0)
    keep, kept_share = keep_mask(torch.Size([250_000, 4]), 0.25)
    assert kept_share == 0.75
    lanes = 1 - keep.float().mean(0)  # each column is one 16-bit lane of a word
    assert torch.all((lanes - 0.25).abs() < 0.005), lanes  # 5 binomial standard deviations
    assert keep_mask(torch.Size([8]), 0.0)[0].all()

    adapter = LoraAdapter.initial(16, 8, r=4, scaling=2.0, dropout=0.3)
    nn.init.normal_(adapter.lora_B.weight)
    x = torch.randn(4000, 16) + 1.0  # a mean away from zero, so a missing 1/(1-p) shows
    expected = adapter.eval()(x)
    adapter.train()
    draws = torch.stack([adapter(x) for _ in range(50)])
    assert not torch.allclose(draws[0], draws[1]), "dropout drew nothing"
    # The mean over 50 draws × 4,000 rows of the update, against the update without dropout.
    torch.testing.assert_close(draws.mean((0, 1)), expected.mean(0), atol=0.02, rtol=0)
    out = torch.zeros(4000, 8)
    torch.manual_seed(1)
    forward = adapter(x)
    torch.manual_seed(1)
    torch.testing.assert_close(adapter.add_to(out, x), forward)  # both paths draw the same mask
