"""Prefix tuning on the tiny LLaVA: masks, gradients, padding invariance, generate."""

from pathlib import Path

import pytest
import torch
from peft_lm_inputs import SEQUENCES, cache_key, image_prompt, lm_of, padded
from transformers.cache_utils import DynamicCache

from vla_peft.models import load_vlm
from vla_peft.peft.config import load_method_config
from vla_peft.peft.prefix import PrefixConfig, inject_prefix

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "peft"
M = 4


def load(tiny_llava_dir, **config):
    model, _ = load_vlm(tiny_llava_dir)
    modules = inject_prefix(model, PrefixConfig(length=M, **config))
    return model, modules




def capture_lm_kwargs(lm) -> dict:
    """Record the arguments the language model's forward receives after the prefix hook."""
    seen: dict = {}
    lm.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    return seen


def test_prefix_fills_cache_extends_mask_and_keeps_positions(tiny_llava_dir):
    model, (encoder,) = load(tiny_llava_dir)
    lm = lm_of(model)
    seen = capture_lm_kwargs(lm)
    ids, mask = padded(SEQUENCES, "right")
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, use_cache=True)
        prefix = encoder.key_values()
    n = ids.shape[1]
    assert out.last_hidden_state.shape == (2, n, lm.config.hidden_size)
    assert seen["attention_mask"].shape == (2, M + n)
    assert seen["attention_mask"][:, :M].all() and torch.equal(seen["attention_mask"][:, M:], mask)
    assert torch.equal(seen["position_ids"], torch.arange(n).unsqueeze(0))
    cache = out[cache_key(lm)]
    assert cache.get_seq_length() == M + n
    for layer in range(lm.config.num_hidden_layers):
        keys = cache.layers[layer].keys
        assert keys.shape == (2, lm.config.num_key_value_heads, M + n, prefix.shape[-1])
        assert torch.equal(keys[:, :, :M], prefix[layer, 0].expand(2, -1, -1, -1))


def test_prefix_disabled_is_exactly_the_base(tiny_llava_dir):
    base, _ = load_vlm(tiny_llava_dir)
    model, (encoder,) = load(tiny_llava_dir, reparameterize=True)
    inputs = image_prompt(model, SEQUENCES[0])
    with torch.no_grad():
        expected = base(**inputs).logits
        changed = model(**inputs).logits
        encoder.enabled = False
        disabled = model(**inputs).logits
    assert not torch.allclose(changed, expected, atol=1e-4)  # the prefix does act when enabled
    assert torch.equal(disabled, expected)


@pytest.mark.parametrize("reparameterize", [False, True])
def test_gradients_only_in_prefix_and_closed_form_counts(tiny_llava_dir, reparameterize):
    model, modules = load(tiny_llava_dir, reparameterize=reparameterize, reparam_hidden=32)
    text = model.config.text_config
    layers, d = text.num_hidden_layers, text.hidden_size
    d_kv = text.num_key_value_heads * (getattr(text, "head_dim", None) or d // text.num_attention_heads)
    if reparameterize:
        e, h = d, 32
        expected = M * e + (e * h + h) + (h * 2 * layers * d_kv + 2 * layers * d_kv)
    else:
        expected = layers * 2 * M * d_kv
    injected = {id(p) for module in modules for p in module.parameters()}
    assert sum(p.numel() for module in modules for p in module.parameters()) == expected

    model.train()
    model(**image_prompt(model, SEQUENCES[0])).logits.square().mean().backward()
    for name, param in model.named_parameters():
        if id(param) in injected:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


def test_cache_given_positionally_or_under_the_old_name(tiny_llava_dir):
    """Callers may pass the cache positionally or as ``past_key_values`` (the pre-5.24 name)."""
    model, _ = load(tiny_llava_dir)
    lm = lm_of(model)
    ids = torch.tensor([SEQUENCES[0]])
    with torch.no_grad():
        expected = lm(input_ids=ids).last_hidden_state
        for call in (lambda c: lm(ids, None, None, c), lambda c: lm(input_ids=ids, past_key_values=c)):
            cache = DynamicCache()
            torch.testing.assert_close(call(cache).last_hidden_state, expected, atol=0, rtol=0)
            assert cache.get_seq_length() == M + ids.shape[1]

def test_gradient_checkpointing_and_4d_masks_are_refused(tiny_llava_dir):
    model, _ = load(tiny_llava_dir)
    lm = lm_of(model)
    ids = torch.tensor([SEQUENCES[0]])
    n = ids.shape[1]
    with pytest.raises(ValueError, match="2D attention mask"):
        lm(input_ids=ids, attention_mask=torch.ones(1, 1, n, n, dtype=torch.bool))
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids)


def test_injecting_twice_is_refused(tiny_llava_dir):
    model, _ = load(tiny_llava_dir)
    with pytest.raises(ValueError, match="once per model"):
        inject_prefix(model, PrefixConfig(length=M))


@pytest.mark.parametrize(
    "bad, field",
    [({"length": 0}, "length"), ({"length": 2.5}, "length"), ({"embed_dim": -1}, "embed_dim"),
     ({"reparam_hidden": 0}, "reparam_hidden"), ({"reparameterize": "yes"}, "reparameterize")],
)
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        PrefixConfig(**bad)


def test_yaml_config_loads_with_overrides():
    config = load_method_config(CONFIGS / "prefix.yaml", {"length": 8})
    assert isinstance(config, PrefixConfig) and config.length == 8
    assert config.to_dict()["method"] == "prefix"
    with pytest.raises(ValueError, match="reparameterize"):
        load_method_config(CONFIGS / "prefix.yaml", {"reparametrize": True})


def test_saves_and_loads_through_the_public_api(tiny_llava_dir, tmp_path):
    """inject -> save_adapter -> load_adapter onto a fresh base gives the same outputs;
    set_peft_enabled(False) gives the base's."""
    from vla_peft import inject, load_adapter, save_adapter, set_peft_enabled

    base, _ = load_vlm(tiny_llava_dir)
    model, _ = load_vlm(tiny_llava_dir)
    inject(model, PrefixConfig(length=M, reparameterize=True, reparam_hidden=32))
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


@pytest.mark.slow  # loading the NF4 base takes seconds on the CPU
def test_trains_and_generates_over_a_4bit_base(tiny_llava_dir):
    pytest.importorskip("bitsandbytes")
    model, _ = load_vlm(tiny_llava_dir, load_in_4bit=True)
    (module,) = inject_prefix(model, PrefixConfig(length=M, reparameterize=True, reparam_hidden=32))
    inputs = image_prompt(model, SEQUENCES[0])
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in module.parameters())
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]
