"""Prompt tuning on the tiny LLaVA: inputs, masks, positions, gradients, padding, generate."""

from pathlib import Path

import pytest
import torch
from peft_lm_inputs import SEQUENCES, cache_key, image_prompt, lm_of, padded, positions

from vla_peft.models import load_vlm
from vla_peft.peft.config import load_method_config
from vla_peft.peft.prefix import PromptConfig, inject_prompt

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "peft"
M = 3


def load(tiny_llava_dir, **config):
    model, _ = load_vlm(tiny_llava_dir)
    modules = inject_prompt(model, PromptConfig(length=M, **config))
    return model, modules




def test_soft_tokens_mask_and_positions_are_prepended_and_trimmed(tiny_llava_dir):
    model, (prompt,) = load(tiny_llava_dir)
    lm = lm_of(model)
    seen: dict = {}
    lm.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    ids, mask = padded(SEQUENCES, "left")
    pos = positions(mask)
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        embeds = lm.get_input_embeddings()(ids)
    n = ids.shape[1]
    assert seen["input_ids"] is None
    assert torch.equal(seen["inputs_embeds"][:, :M], prompt.tokens.expand(2, -1, -1))
    assert torch.equal(seen["inputs_embeds"][:, M:], embeds)
    assert seen["attention_mask"][:, :M].all() and torch.equal(seen["attention_mask"][:, M:], mask)
    assert torch.equal(seen["position_ids"], torch.cat([torch.arange(M).expand(2, M), pos + M], dim=-1))
    # Outputs line up with the caller's tokens: the soft positions are trimmed away.
    assert out.last_hidden_state.shape == (2, n, lm.config.hidden_size)
    assert all(h.shape[1] == n for h in out.hidden_states)
    assert out[cache_key(lm)].get_seq_length() == M + n


def test_vocab_init_copies_vocabulary_rows_and_random_init_does_not(tiny_llava_dir):
    model, (prompt,) = load(tiny_llava_dir, init="vocab", seed=3)
    table = lm_of(model).get_input_embeddings().weight
    assert all((table == row).all(-1).any() for row in prompt.tokens)
    model, (prompt,) = load(tiny_llava_dir, init="random", seed=3)
    assert not any((table == row).all(-1).any() for row in prompt.tokens)


def test_prompt_disabled_is_exactly_the_base(tiny_llava_dir):
    base, _ = load_vlm(tiny_llava_dir)
    model, (prompt,) = load(tiny_llava_dir)
    inputs = image_prompt(model, SEQUENCES[0])
    with torch.no_grad():
        expected = base(**inputs).logits
        changed = model(**inputs).logits
        prompt.enabled = False
        disabled = model(**inputs).logits
    assert changed.shape == expected.shape
    assert not torch.allclose(changed, expected, atol=1e-4)  # the soft tokens do act when enabled
    assert torch.equal(disabled, expected)


def test_gradients_only_in_soft_tokens_and_count(tiny_llava_dir):
    model, modules = load(tiny_llava_dir)
    assert sum(p.numel() for module in modules for p in module.parameters()) == M * model.config.text_config.hidden_size
    injected = {id(p) for module in modules for p in module.parameters()}
    model.train()
    inputs = image_prompt(model, SEQUENCES[0])
    # Labels work unchanged because the outputs keep the input's length.
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    for name, param in model.named_parameters():
        if id(param) in injected:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


def test_4d_mask_and_injecting_twice_are_refused(tiny_llava_dir):
    model, _ = load(tiny_llava_dir)
    n = len(SEQUENCES[0])
    with pytest.raises(ValueError, match="2D attention mask"):
        lm_of(model)(input_ids=torch.tensor([SEQUENCES[0]]), attention_mask=torch.ones(1, 1, n, n, dtype=torch.bool))
    with pytest.raises(ValueError, match="once per model"):
        inject_prompt(model, PromptConfig(length=M))


@pytest.mark.parametrize(
    "bad, field", [({"length": -2}, "length"), ({"init": "text"}, "init"), ({"seed": "zero"}, "seed")]
)
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        PromptConfig(**bad)


def test_yaml_config_loads_with_overrides():
    config = load_method_config(CONFIGS / "prompt.yaml", {"init": "random"})
    assert isinstance(config, PromptConfig) and config.init == "random" and config.length == 16


def test_saves_and_loads_through_the_public_api(tiny_llava_dir, tmp_path):
    """inject -> save_adapter -> load_adapter onto a fresh base gives the same outputs;
    set_peft_enabled(False) gives the base's."""
    from vla_peft import inject, load_adapter, save_adapter, set_peft_enabled

    base, _ = load_vlm(tiny_llava_dir)
    model, _ = load_vlm(tiny_llava_dir)
    inject(model, PromptConfig(length=M))
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
    (module,) = inject_prompt(model, PromptConfig(length=M))
    inputs = image_prompt(model, SEQUENCES[0])
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in module.parameters())
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]
