"""AdapterBank: switching between task bundles on one base equals loading each bundle fresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval_synth import make_policy, one_torch_thread
from vla_peft.models import load_vlm, save_tiny_llava
from vla_peft.peft.lora import lora_layers
from vla_peft.policy.bundle import BundleMismatchError, load_bundle, save_bundle
from vla_peft.serve import AdapterBank


one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def bundles(tiny_llava_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    paths = {}
    for name, seed, lora in (("A", 1, True), ("B", 2, True), ("H", 3, False)):
        paths[name] = save_bundle(make_policy(tiny_llava_dir, seed, lora=lora), root / name)
    # test-time augmentation: each chunk is the mean over 2 x 2 evaluation crops
    paths["T"] = save_bundle(make_policy(tiny_llava_dir, 4, center_crop=0.8, eval_crop_grid=2), root / "T")
    return paths


@pytest.fixture(scope="module")
def obs():
    rng = np.random.default_rng(0)
    return {
        "agentview_rgb": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        "ee_pos": rng.uniform(-0.2, 0.2, (2, 3)).astype(np.float32),
        "gripper_states": rng.uniform(0, 0.05, (2, 2)).astype(np.float32),
        "instruction": ["reach the red cube", "push the blue cube"],
    }


def act(policy, obs):
    return policy.predict_chunk(obs, binarize_gripper=False)


def fresh(path, base, obs):
    """Outputs of the bundle loaded on its own, on a freshly loaded base."""
    vlm, processor = load_vlm(base)
    return act(load_bundle(path, vlm=vlm, processor=processor), obs)


def base_weights(vlm):
    return {p: layer.base_layer.weight.detach().clone() for p, layer in lora_layers(vlm).items()}


def test_unmerged_switch_a_b_a_equals_fresh_a(tiny_llava_dir, bundles, obs):
    bank = AdapterBank.from_base(tiny_llava_dir)
    for name in ("A", "B", "H"):
        bank.register(name, bundles[name])
    first_a = act(bank.activate("A"), obs)
    out_b = act(bank.activate("B"), obs)
    out_h = act(bank.activate("H"), obs)
    again_a = act(bank.activate("A"), obs)
    reference = fresh(bundles["A"], tiny_llava_dir, obs)
    np.testing.assert_array_equal(first_a, reference)
    np.testing.assert_array_equal(again_a, reference)
    np.testing.assert_array_equal(out_b, fresh(bundles["B"], tiny_llava_dir, obs))
    np.testing.assert_array_equal(out_h, fresh(bundles["H"], tiny_llava_dir, obs))
    assert np.abs(out_b - reference).max() > 1e-3  # the bundles really differ


def test_unmerged_switch_touches_no_weight(tiny_llava_dir, bundles):
    bank = AdapterBank.from_base(tiny_llava_dir)
    bank.register("A", bundles["A"])
    bank.register("B", bundles["B"])
    bank.activate("A")
    before = {k: v.clone() for k, v in bank.vlm.state_dict().items()}
    bank.activate("B")
    assert bank.vlm.lora_active_adapter.name == "B"
    after = bank.vlm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_registered_bundles_are_frozen_and_in_eval(tiny_llava_dir, bundles):
    """register freezes and evals only the new parts (no walk over the resident adapters): check all of it."""
    bank = AdapterBank.from_base(tiny_llava_dir)
    for name in ("A", "B", "H"):
        bank.register(name, bundles[name])
    modules = [*bank.vlm.modules(), *(m for policy in bank.policies.values() for m in policy.modules())]
    assert not any(m.training for m in modules)
    assert not any(p.requires_grad for m in modules for p in m.parameters(recurse=False))
    assert len(lora_layers(bank.vlm)) > 0 and all(set(layer.adapters) == {"A", "B"} for layer in lora_layers(bank.vlm).values())


def test_merged_switch_a_b_a_and_weights_restored(tiny_llava_dir, bundles, obs):
    bank = AdapterBank.from_base(tiny_llava_dir, mode="merged")
    bank.register("A", bundles["A"])
    bank.register("B", bundles["B"])
    original = base_weights(bank.vlm)  # LoRA layers exist now; nothing merged yet
    reference = fresh(bundles["A"], tiny_llava_dir, obs)
    first_a = act(bank.activate("A"), obs)
    merged_a = base_weights(bank.vlm)
    assert any((merged_a[p] - original[p]).abs().max() > 1e-4 for p in original)  # A is in the weights
    out_b = act(bank.activate("B"), obs)
    again_a = act(bank.activate("A"), obs)
    np.testing.assert_allclose(first_a, reference, atol=1e-5)
    np.testing.assert_allclose(again_a, reference, atol=1e-5)
    np.testing.assert_allclose(out_b, fresh(bundles["B"], tiny_llava_dir, obs), atol=1e-5)
    bank.unmerge_all()
    assert max(float((base_weights(bank.vlm)[p] - original[p]).abs().max()) for p in original) <= 1e-6


def test_register_while_merged_keeps_the_active_bundle(tiny_llava_dir, bundles, obs):
    bank = AdapterBank.from_base(tiny_llava_dir, mode="merged")
    bank.register("A", bundles["A"])
    before = act(bank.activate("A"), obs)
    bank.register("B", bundles["B"])
    assert bank.active == "A"
    np.testing.assert_allclose(act(bank.policy, obs), before, atol=1e-6)


def test_register_from_memory_equals_from_disk(tiny_llava_dir, bundles, obs):
    trained_elsewhere = make_policy(tiny_llava_dir, 1)  # same seed as bundle A, on its own base copy
    bank = AdapterBank.from_base(tiny_llava_dir)
    bank.register("A_mem", trained_elsewhere)
    bank.register("B", bundles["B"])
    bank.activate("B")
    np.testing.assert_array_equal(act(bank.activate("A_mem"), obs), fresh(bundles["A"], tiny_llava_dir, obs))


def test_register_from_memory_holds_its_own_copy(tiny_llava_dir, obs):
    """A bank's policy takes a bundle's tensors as its weights; from memory it copies them first, so
    training the source on afterwards leaves the registered bundle as it was."""
    source = make_policy(tiny_llava_dir, 1)
    bank = AdapterBank.from_base(tiny_llava_dir)
    bank.register("A", source)
    before = act(bank.activate("A"), obs)
    with torch.no_grad():
        for param in [*source.head.parameters(), source.queries, *source.proprio.parameters()]:
            param.add_(0.5)
    np.testing.assert_array_equal(act(bank.policy, obs), before)


def test_bank_acts_without_the_aux_head(tiny_llava_dir, tmp_path, obs):
    """The aux head only trains: a bank does not build it, and acts as the whole bundle does."""
    path = save_bundle(make_policy(tiny_llava_dir, 5, aux_keys=["ee_pos"], aux_dim=3), tmp_path / "aux")
    bank = AdapterBank.from_base(tiny_llava_dir)
    bank.register("aux", path)
    whole = load_bundle(path, *load_vlm(tiny_llava_dir))
    assert bank.policies["aux"].aux_head is None and whole.aux_head is not None
    np.testing.assert_array_equal(act(bank.activate("aux"), obs), act(whole, obs))


def test_a_bundle_on_more_layers_is_switched_on_all_of_them(tiny_llava_dir, tmp_path, obs):
    """A second bundle that wraps layers the first did not (here the language MLPs) is merged and
    unmerged on those too: the bank finds the new layers although it walks the model only when needed."""
    wider = {"language": [r"layers\.\d+\.self_attn\.(q|v)_proj", r"layers\.\d+\.mlp\.down_proj"]}
    narrow = save_bundle(make_policy(tiny_llava_dir, 1), tmp_path / "narrow")
    wide = save_bundle(make_policy(tiny_llava_dir, 2, targets=wider), tmp_path / "wide")
    bank = AdapterBank.from_base(tiny_llava_dir, mode="merged")
    bank.register("narrow", narrow)
    bank.register("wide", wide)
    assert len(bank._layers) == len(lora_layers(bank.vlm)) > len(lora_layers(load_bundle(narrow, *load_vlm(tiny_llava_dir)).vlm))
    np.testing.assert_allclose(act(bank.activate("wide"), obs), fresh(wide, tiny_llava_dir, obs), atol=1e-5)
    np.testing.assert_allclose(act(bank.activate("narrow"), obs), fresh(narrow, tiny_llava_dir, obs), atol=1e-5)


def test_bundle_for_another_base_is_refused_at_registration(tiny_llava_dir, bundles, tmp_path):
    other_base = save_tiny_llava(tmp_path / "other_base", seed=1)  # same shapes, other weights
    bank = AdapterBank.from_base(other_base)
    with pytest.raises(BundleMismatchError, match="another base"):
        bank.register("A", bundles["A"])
    assert bank.names == [] and not lora_layers(bank.vlm)


def test_unknown_name_and_duplicate_name_are_clear(tiny_llava_dir, bundles):
    bank = AdapterBank.from_base(tiny_llava_dir)
    bank.register("A", bundles["A"])
    with pytest.raises(KeyError, match="registered: \\['A'\\]"):
        bank.activate("Z")
    with pytest.raises(ValueError, match="already registered"):
        bank.register("A", bundles["B"])


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
def test_remove_frees_a_bundle_and_leaves_the_others_as_they_were(tiny_llava_dir, bundles, obs, mode):
    """A robot drops a task it is done with: its LoRA leaves every layer and its tensors are freed,
    the others act as before, and the name can be registered again."""
    import gc
    import weakref

    bank = AdapterBank.from_base(tiny_llava_dir, mode=mode)
    for name in ("A", "B", "H"):
        bank.register(name, bundles[name])
    before = {name: act(bank.activate(name), obs) for name in ("A", "H")}
    lora_b = weakref.ref(next(iter(lora_layers(bank.vlm).values())).adapters["B"].lora_A.weight)
    head_b = weakref.ref(bank.policies["B"].head)
    with pytest.raises(ValueError, match="active"):
        bank.remove("H")
    bank.activate("A")
    bank.remove("B")
    gc.collect()
    assert lora_b() is None and head_b() is None, "the removed bundle's tensors are still held"
    assert bank.names == ["A", "H"] and "B" not in bank.vlm.peft_config_vla
    assert all("B" not in layer.adapters for layer in lora_layers(bank.vlm).values())
    atol = 0 if mode == "unmerged" else 1e-5  # merging rounds the weights in the last bits
    for name in ("H", "A"):
        np.testing.assert_allclose(act(bank.activate(name), obs), before[name], rtol=0, atol=atol)
    with pytest.raises(KeyError, match="no bundle named 'B'"):
        bank.remove("B")
    bank.register("B", bundles["B"])
    np.testing.assert_allclose(act(bank.activate("B"), obs), fresh(bundles["B"], tiny_llava_dir, obs), rtol=0, atol=atol)


def test_merged_mode_refuses_a_4bit_base(tiny_llava_dir):
    vlm, processor = load_vlm(tiny_llava_dir, load_in_4bit=True)
    with pytest.raises(ValueError, match="4-bit"):
        AdapterBank(vlm, processor, mode="merged")
    AdapterBank(vlm, processor, mode="unmerged")  # unmerged works on NF4


@pytest.mark.parametrize("second", ["B", "T"])
def test_mixed_batch_equals_each_bundle_on_its_own_rows(tiny_llava_dir, bundles, second):
    rng = np.random.default_rng(1)
    obs = {
        "agentview_rgb": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
        "ee_pos": rng.uniform(-0.2, 0.2, (3, 3)).astype(np.float32),
        "gripper_states": rng.uniform(0, 0.05, (3, 2)).astype(np.float32),
        "instruction": ["reach the red cube", "stack the small green cube on the big blue cube", "push it"],
    }
    names = ["A", second, "A"]
    bank = AdapterBank.from_base(tiny_llava_dir)
    for name in ("A", second):
        bank.register(name, bundles[name])
    bank.activate(second)
    mixed = bank.predict_mixed(obs, names, binarize_gripper=False)
    assert bank.active == second and bank.vlm.lora_active_adapter.name == second
    for row, name in enumerate(names):
        single = {k: v[row] for k, v in obs.items()}
        np.testing.assert_allclose(mixed[row], act(bank.activate(name), single), atol=1e-5)
    merged = AdapterBank.from_base(tiny_llava_dir, mode="merged")
    with pytest.raises(ValueError, match="unmerged"):
        merged.predict_mixed(obs, names)
