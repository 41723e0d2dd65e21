"""Behaviour prefix and prompt tuning must share: padding invariance, generate, the embeds + cache route."""

import pytest
import torch
from peft_lm_inputs import (
    SEQUENCES,
    assert_generate_matches_reference,
    cache_key,
    image_prompt,
    lm_of,
    padded,
    positions,
)
from transformers.cache_utils import DynamicCache

from vla_peft.models import load_vlm
from vla_peft.peft.prefix import (
    PrefixConfig,
    PromptConfig,
    inject_prefix,
    inject_prompt,
)

METHODS = {
    "prefix": lambda model, **config: inject_prefix(model, PrefixConfig(length=4, **config)),
    "prompt": lambda model, **config: inject_prompt(model, PromptConfig(length=3, **config)),
}
# The padded-batch check also covers prefix tuning's MLP reparameterisation.
PADDED_BATCH_CONFIG = {"prefix": {"reparameterize": True}, "prompt": {}}


def load(tiny_llava_dir, method, **config):
    model, _ = load_vlm(tiny_llava_dir)
    return model, METHODS[method](model, **config)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sample_alone(tiny_llava_dir, method, side):
    model, _ = load(tiny_llava_dir, method, **PADDED_BATCH_CONFIG[method])
    ids, mask = padded(SEQUENCES, side)
    # Right padding needs no positions; left padding needs positions that skip the pads,
    # exactly as for the base model (generate computes them this way).
    extra = {"position_ids": positions(mask)} if side == "left" else {}
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, **extra).logits
        for row, seq in enumerate(SEQUENCES):
            alone = model(input_ids=torch.tensor([seq])).logits[0]
            torch.testing.assert_close(batch[row, mask[row].bool()], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_generate_reproduces_uncached_greedy_and_is_deterministic(tiny_llava_dir, method):
    model, _ = load(tiny_llava_dir, method)
    with torch.no_grad():
        assert_generate_matches_reference(model, image_prompt(model, SEQUENCES[0]))
        ids, mask = padded(SEQUENCES, "left")
        assert_generate_matches_reference(model, {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("method", METHODS)
def test_generate_left_padded_batch_matches_each_sample_alone(tiny_llava_dir, method):
    model, _ = load(tiny_llava_dir, method)
    ids, mask = padded(SEQUENCES, "left")
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        for row, seq in enumerate(SEQUENCES):
            alone = model.generate(input_ids=torch.tensor([seq]), max_new_tokens=5, do_sample=False)
            new = alone[0, len(seq) :]
            assert torch.equal(batch[row, ids.shape[1] : ids.shape[1] + len(new)], new)


@pytest.mark.parametrize("method", METHODS)
def test_generate_disabled_equals_base_generate(tiny_llava_dir, method):
    base, _ = load_vlm(tiny_llava_dir)
    model, (module,) = load(tiny_llava_dir, method)
    module.enabled = False
    inputs = image_prompt(model, SEQUENCES[1])
    with torch.no_grad():
        expected = base.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected)


@pytest.mark.parametrize("method", METHODS)
def test_inputs_embeds_route_with_a_cache(tiny_llava_dir, method):
    """The route a policy takes: hand-built embeddings, a mask, and a cache carried across calls."""
    model, _ = load(tiny_llava_dir, method)
    lm = lm_of(model)
    ids, mask = padded(SEQUENCES, "right")
    embeds = lm.get_input_embeddings()(ids)
    key = cache_key(lm)
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=mask).last_hidden_state
        via_embeds = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(via_embeds, full, atol=1e-6, rtol=0)
        for pos in (None, positions(mask)):  # positions left to the model, or given as generate does
            full = lm(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            given = {} if pos is None else {"position_ids": pos[:, :-1]}
            first = lm(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1], **given, **{key: DynamicCache()})
            given = {} if pos is None else {"position_ids": pos[:, -1:]}
            step = lm(inputs_embeds=embeds[:, -1:], attention_mask=mask, **given, **{key: first[key]})
            torch.testing.assert_close(step.last_hidden_state[:, 0], full[:, -1], atol=1e-5, rtol=0)
