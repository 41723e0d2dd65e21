"""predict_chunk refuses bad observations with one error naming the key and the fix, never returns
NaN actions; a damaged bundle file is one error naming the file and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval_synth import make_policy, one_torch_thread
from serve_synth import observation
from vla_peft.policy import NonFiniteActionError, ObservationError
from vla_peft.policy.bundle import BundleFileError, load_bundle, save_bundle
from vla_peft.serve.bank import AdapterBank

one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def policy(tiny_llava_dir):
    return make_policy(tiny_llava_dir, seed=1)


def obs(**change) -> dict:
    return {**observation(0), "instruction": "reach the red cube", **change}


BAD_OBSERVATIONS = {
    "NaN state": (dict(gripper_states=np.array([np.nan, 0.0], np.float32)), "'gripper_states': holds NaN or infinity"),
    "inf state": (dict(ee_pos=np.array([0.0, np.inf, 0.0])), "'ee_pos': holds NaN or infinity"),
    "finite in float64, inf in float32": (dict(ee_pos=np.array([1e300, 0.0, 0.0])), "'ee_pos': holds NaN or infinity"),
    "state of the wrong length": (dict(gripper_states=np.array([0.01])),
                                  r"got ee_pos \(3\) \+ gripper_states \(1\) = 4 values.*state_keys "
                                  r"\['ee_pos', 'gripper_states'\] with state_dim=5"),
    "non-string instruction": (dict(instruction=5), "'instruction' must be a string"),
    "non-string in a batch": (dict(instruction=["reach", None]), "'instruction' must be a string, got NoneType"),
    "<image> in the instruction": (dict(instruction="reach <image>"), "reserved token '<image>'"),
    "instruction over the limit": (dict(instruction="x" * 1001), "1001 characters, over the limit of 1000"),
    "missing state key": (dict(ee_pos=None), "no state key 'ee_pos'"),
    "missing camera": (dict(agentview_rgb=None), "no image 'agentview_rgb'"),
    "text as state": (dict(ee_pos=np.array(["a", "b", "c"])), "'ee_pos': state must be numbers"),
}


@pytest.mark.parametrize("case", list(BAD_OBSERVATIONS))
def test_a_bad_observation_is_one_clear_error(policy, case):
    change, words = BAD_OBSERVATIONS[case]
    bad = {k: v for k, v in obs(**change).items() if v is not None}
    if case == "non-string in a batch":
        bad = {k: (v if k == "instruction" else np.stack([np.asarray(v)] * 2)) for k, v in bad.items()}
    with pytest.raises(ObservationError, match=words):
        policy.predict_chunk(bad)


def test_a_good_observation_unbatched_or_batched_gives_the_same_actions(policy):
    one = policy.predict_chunk(obs())
    two = policy.predict_chunk({k: ([v, v] if k == "instruction" else np.stack([v, v])) for k, v in obs().items()})
    assert one.shape == (4, 4) and np.isfinite(one).all()
    np.testing.assert_allclose(two[1], one, atol=1e-6)
    np.testing.assert_allclose(policy.predict_chunk(obs(ee_pos=[0.0, 0.1, -0.1])),  # a list of numbers is accepted
                               policy.predict_chunk(obs(ee_pos=np.array([0.0, 0.1, -0.1], np.float32))))


def test_non_finite_actions_are_never_returned(tiny_llava_dir):
    policy = make_policy(tiny_llava_dir, seed=2)
    with torch.no_grad():
        next(policy.head.parameters()).fill_(float("nan"))  # a bundle with broken weights
    with pytest.raises(NonFiniteActionError, match="NaN or infinite actions.*refusing to return them"):
        policy.predict_chunk(obs())


def damage(bundle, name: str) -> None:
    file = bundle / name
    if name == "bundle.json":
        file.write_text(file.read_text()[:100])  # cut mid-way: not JSON any more
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize("name", ["policy.safetensors", "normalizers.safetensors", "bundle.json"])
def test_a_damaged_bundle_file_is_named_with_the_fix(tiny_llava_dir, tmp_path, name):
    policy = make_policy(tiny_llava_dir, seed=3)
    bundle = save_bundle(policy, tmp_path / "bundle")
    damage(bundle, name)
    with pytest.raises(BundleFileError, match=rf"{name} is damaged.*copy the bundle again") as info:
        load_bundle(bundle, vlm=policy.vlm, processor=policy.processor)
    assert str(bundle / name) in str(info.value)
    bank = AdapterBank(policy.vlm, policy.processor)
    with pytest.raises(BundleFileError, match=rf"{name} is damaged"):
        bank.register("damaged", bundle)
    assert bank.names == [] and "damaged" not in (getattr(policy.vlm, "peft_config_vla", None) or {})


def test_a_bundle_json_that_is_not_an_object_or_lacks_its_parts_is_named(tiny_llava_dir, tmp_path):
    policy = make_policy(tiny_llava_dir, seed=3, lora=False)
    bundle = save_bundle(policy, tmp_path / "bundle")
    manifest = json.loads((bundle / "bundle.json").read_text())
    for broken, words in ((["a list"], "not an object"), ({"format_version": 1}, "lacks"),
                          ({**manifest, "policy": {**manifest["policy"], "chunksize": 3}}, "unknown key 'chunksize'")):
        (bundle / "bundle.json").write_text(json.dumps(broken))
        with pytest.raises(BundleFileError, match=rf"bundle.json is damaged.*{words}"):
            load_bundle(bundle, vlm=policy.vlm, processor=policy.processor)


def test_the_prompt_cache_stays_bounded_whatever_clients_send(policy, monkeypatch):
    monkeypatch.setattr("vla_peft.policy.policy.PROMPT_CACHE_SIZE", 3)
    for i in range(7):
        policy.predict_chunk(obs(instruction=f"reach the cube {i}"))
    assert 0 < len(policy._prompt_ids) <= 3
