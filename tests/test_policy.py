"""VLAPolicy on the tiny LLaVA: input assembly, heads, image checks, action queue, gripper convention."""

import numpy as np
import pytest
import torch

from policy_synth import IMAGE_SIZE, write_demos
from pathlib import Path

from vla_peft.data import DataConfig, build_datasets
from vla_peft.peft.config import load_method_config
from vla_peft.policy import PolicyConfig, VLAPolicy
from vla_peft.policy.heads import DiscreteHead

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_demos(tmp_path_factory.mktemp("policy_demos") / "synth.hdf5")


@pytest.fixture(scope="module")
def datasets(demos):
    return build_datasets(DataConfig(paths=[str(demos)], chunk_size=4, val_fraction=0.2))


def make_policy(tiny_llava_dir, datasets, method=None, **overrides):
    config = PolicyConfig(base=str(tiny_llava_dir), image_size=IMAGE_SIZE, state_dim=5, chunk_size=4, **overrides)
    torch.manual_seed(0)
    method = None if method is None else load_method_config(REPO / "configs" / "peft" / f"{method}.yaml")
    return VLAPolicy.from_config(config, method, normalizers=datasets[0].normalizers)


def raw_obs(demos, demo=0, t=3, instruction="reach the red cube"):
    import h5py

    with h5py.File(demos) as f:
        g = f[f"data/demo_{demo}/obs"]
        return {k: g[k][t] for k in ("agentview_rgb", "ee_pos", "gripper_states")} | {"instruction": instruction}


def test_hand_built_inputs_equal_llava_builtin_route(tiny_llava_dir, datasets):
    """The prompt + image features the policy splices by hand give the hidden states of LLaVA's own forward."""
    policy = make_policy(tiny_llava_dir, datasets)
    batch = next(iter(torch.utils.data.DataLoader(datasets[0], batch_size=2)))
    images, state = batch["images"][:, :, -1], batch["state"][:, -1]
    embeds, mask, positions = policy.embed(images, state, list(batch["instruction"]))
    extra = 1 + policy.head.num_queries  # proprio token + action queries
    ours = policy.vlm.model.language_model(inputs_embeds=embeds[:, :-extra], attention_mask=mask[:, :-extra],
                                           position_ids=positions[:, :-extra]).last_hidden_state
    num_tokens = (policy.model_image_size // 16) ** 2
    ids = torch.tensor([policy._prompt(text, num_tokens) for text in batch["instruction"]])
    pixels = policy.pixels(images).flatten(0, 1)
    builtin = policy.vlm.model(input_ids=ids, pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, builtin, atol=1e-5, rtol=1e-5)


def test_prompt_is_the_pretraining_question_the_base_learned(tiny_llava_dir, datasets):
    """BOS first (LLaVA's tokenizer adds it; the tiny one does not), then exactly the tokens the
    tiny base was pretrained on for an instruction question, so its grounding carries over."""
    from vla_peft.models.tiny import ACTION_PROMPT
    from vla_peft.pretrain.train import QATokenizer

    policy = make_policy(tiny_llava_dir, datasets)
    question = ACTION_PROMPT.format(instruction="reach the red cube")
    pretraining, _ = QATokenizer(policy.tokenizer, 16).conversation([(question, " one two")])
    ours = policy._prompt("reach the red cube", 16)
    assert ours[0] == policy.tokenizer.bos_token_id and pretraining[: len(ours)] == ours


@pytest.mark.parametrize("method", [None, "prompt", "prefix"])
def test_padded_batch_gives_each_samples_own_result(method, tiny_llava_dir, datasets, demos):
    """Left padding with explicit positions: a sample's output does not depend on its batch mates,
    also when prompt or prefix tuning add tokens or keys of their own."""
    policy = make_policy(tiny_llava_dir, datasets, method)
    with torch.no_grad():  # move the soft tokens / prefixes away from their initial values
        for param in policy.vlm.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    a, b = raw_obs(demos, 0, 2, "reach the red cube"), raw_obs(demos, 1, 5, "touch the red block now please")
    batch = {k: (np.stack([a[k], b[k]]) if k != "instruction" else [a[k], b[k]]) for k in a}
    together = policy.predict_chunk(batch, binarize_gripper=False)
    np.testing.assert_allclose(together[0], policy.predict_chunk(a, binarize_gripper=False), atol=1e-5)
    np.testing.assert_allclose(together[1], policy.predict_chunk(b, binarize_gripper=False), atol=1e-5)
    assert together.shape == (2, 4, 4)


def test_eval_crop_grid_averages_the_chunks_of_the_crops(tiny_llava_dir, datasets, demos):
    """Test-time augmentation: the chunk is the mean of the chunks of the n x n crops, each
    observation of a batch averaged over its own crops only."""
    from vla_peft.data.augment import ImageAugment, to_float_chw

    policy = make_policy(tiny_llava_dir, datasets, center_crop=0.8, eval_crop_grid=2)
    a, b = raw_obs(demos, 0, 2), raw_obs(demos, 1, 5, "touch the red block now please")
    batch = {k: (np.stack([a[k], b[k]]) if k != "instruction" else [a[k], b[k]]) for k in a}
    together = policy.predict_chunk(batch, binarize_gripper=False)
    np.testing.assert_allclose(together[1], policy.predict_chunk(b, binarize_gripper=False), atol=1e-5)

    side = round(IMAGE_SIZE * 0.8 ** 0.5)  # 29 of 32: crops at offsets 0 and 3 on each axis
    state = policy.normalizers["state"].normalize(torch.from_numpy(np.concatenate([a["ee_pos"], a["gripper_states"]])[None]))
    image = to_float_chw(a["agentview_rgb"])[None]
    with torch.no_grad():
        chunks = [policy.head.decode(policy.head_output(
            ImageAugment(0.8)._crop_resize(image, top, left, side, side)[:, None], state, [a["instruction"]]))
            for top in (0, IMAGE_SIZE - side) for left in (0, IMAGE_SIZE - side)]
    reference = policy.normalizers["actions"].unnormalize(torch.stack(chunks).mean(0))[0].numpy()
    np.testing.assert_allclose(together[0], reference, atol=1e-5)
    assert not np.allclose(chunks[0], chunks[-1])  # the crops do differ

    policy.config.eval_crop_grid = 1  # the centre crop only: another chunk
    assert not np.allclose(policy.predict_chunk(a, binarize_gripper=False), together[0], atol=1e-4)
    uncropped = make_policy(tiny_llava_dir, datasets, eval_crop_grid=2)
    with pytest.raises(ValueError, match="eval_crop_grid=2 needs an evaluation crop"):
        uncropped.predict_chunk(a)


def test_wrong_image_size_and_dtype_are_refused(tiny_llava_dir, datasets, demos):
    policy = make_policy(tiny_llava_dir, datasets)
    obs = raw_obs(demos)
    with pytest.raises(ValueError, match=r"image is 64x64 but the policy expects 32x32.*image_size"):
        policy.predict_chunk(obs | {"agentview_rgb": np.zeros((64, 64, 3), np.uint8)})
    with pytest.raises(ValueError, match="expected uint8"):
        policy.predict_chunk(obs | {"agentview_rgb": obs["agentview_rgb"].astype(np.float32)})


def test_discrete_head_bins_and_decoding(tiny_llava_dir, datasets):
    policy = make_policy(tiny_llava_dir, datasets, head="discrete")
    head: DiscreteHead = policy.head
    specials = set(policy.tokenizer.all_special_ids)
    ids = head.bin_token_ids.tolist()
    assert len(ids) == 256 and not specials & set(ids) and ids[-1] == len(policy.tokenizer) - 1
    values = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0])
    centres = head.bin_centres[head.to_bins(values)]
    assert (centres - values).abs().max() <= 1 / 256 + 1e-6  # half a bin width
    assert head.num_queries == 4 * 4  # one query per (step, dimension)
    with pytest.raises(ValueError, match="fewer than n_bins"):
        make_policy(tiny_llava_dir, datasets, head="discrete", n_bins=600)


def test_action_queue_executes_n_of_k_then_replans(tiny_llava_dir, datasets, demos, monkeypatch):
    policy = make_policy(tiny_llava_dir, datasets, execute_steps=3)
    chunks = iter([np.arange(16, dtype=np.float32).reshape(4, 4), 100 + np.arange(16, dtype=np.float32).reshape(4, 4)])
    calls = []
    monkeypatch.setattr(policy, "predict_chunk", lambda obs, **kw: calls.append(1) or next(chunks))
    policy.reset()
    actions = [policy.select_action(raw_obs(demos)) for _ in range(4)]
    assert len(calls) == 2  # steps 0-2 from the first chunk, step 3 re-plans
    np.testing.assert_array_equal(actions[2], np.arange(8, 12))
    np.testing.assert_array_equal(actions[3], 100 + np.arange(4))


def test_temporal_ensembling_averages_overlapping_chunks(tiny_llava_dir, datasets, demos, monkeypatch):
    policy = make_policy(tiny_llava_dir, datasets, temporal_ensemble=0.5, gripper_dim=None)
    chunks = iter([np.zeros((4, 4), np.float32), np.ones((4, 4), np.float32)])
    monkeypatch.setattr(policy, "predict_chunk", lambda obs, **kw: next(chunks))
    policy.reset()
    policy.select_action(raw_obs(demos))
    second = policy.select_action(raw_obs(demos))
    w = np.exp(-0.5 * np.arange(2))  # ACT: the oldest prediction has weight exp(0)
    np.testing.assert_allclose(second, np.full(4, w[1] / w.sum()), rtol=1e-6)


def test_gripper_convention_round_trip(tiny_llava_dir, datasets):
    """Gripper actions -1 (open) / +1 (close) survive normalisation and come out exactly +-1."""
    policy = make_policy(tiny_llava_dir, datasets)
    norm = policy.normalizers["actions"]
    raw = torch.tensor([[0.1, -0.2, 0.3, -1.0], [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(raw))[:, -1], [-1.0, 1.0], atol=1e-5)
    with torch.no_grad():  # force the head's raw output: gripper slightly positive / negative
        policy.head.mlp[-1].weight.zero_()
        policy.head.mlp[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.02]))
    chunk = policy.predict_chunk(raw_obs_from(datasets))
    assert set(chunk[:, -1].tolist()) == {1.0}
    with torch.no_grad():
        policy.head.mlp[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, -0.02]))
    assert set(policy.predict_chunk(raw_obs_from(datasets))[:, -1].tolist()) == {-1.0}


def raw_obs_from(datasets):
    return {"agentview_rgb": np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), "ee_pos": np.zeros(3, np.float32),
            "gripper_states": np.zeros(2, np.float32), "instruction": "reach the red cube"}


def test_policy_config_errors_name_the_field():
    with pytest.raises(ValueError, match="head='mlp'.*continuous"):
        PolicyConfig(head="mlp")
    with pytest.raises(ValueError, match="execute_steps"):
        PolicyConfig(chunk_size=4, execute_steps=5)
    with pytest.raises(ValueError, match="unknown key 'chunksize'.*chunk_size"):
        PolicyConfig.from_dict({"chunksize": 4})


def test_camera_without_scene_mean_falls_back_to_the_processor_stats_with_one_warning():
    """The shipped base has scene means for agentview and wrist only; a foreign camera (Meta-World's
    ``corner``) is normalised with the processor's per-channel mean/std instead of being refused."""
    import warnings
    from types import SimpleNamespace

    from vla_peft.models.image_norm import load_image_norm
    from vla_peft.policy.image import PixelNormalizer

    base = REPO / "vla_peft" / "pretrain" / "base"
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_mean=mean, image_std=std))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels = PixelNormalizer(["agentview", "corner"], 64, processor, base)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "['corner']" in messages[0] and "mean/std" in messages[0]
    images = torch.rand(2, 2, 3, 64, 64)
    out = pixels(images)
    norm = load_image_norm(base)
    torch.testing.assert_close(out[:, 0], (images[:, 0] - norm.means["agentview"]) / norm.std)
    torch.testing.assert_close(out[:, 1], (images[:, 1] - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))


@pytest.mark.parametrize("head", ["continuous", "flow", "discrete"])
def test_policy_built_from_own_state_acts_as_the_source_and_draws_no_init(head, tiny_llava_dir, datasets, demos):
    """``own_state`` (the bundle-load path) skips the init that the loaded weights replace: the new
    policy holds exactly the source's weights and buffers, acts identically, and consumes no random numbers."""
    source = make_policy(tiny_llava_dir, datasets, aux_keys=["ee_pos"], aux_dim=3, head=head)
    torch.manual_seed(1)
    expected_draw = torch.rand(4)
    torch.manual_seed(1)
    built = VLAPolicy(source.config, source.vlm, source.processor, own_state=source.own_state_dict())
    assert torch.equal(torch.rand(4), expected_draw)  # no init drawn
    ours, theirs = built.state_dict(), source.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for (name, buffer), (_, wanted) in zip(built.head.named_buffers(), source.head.named_buffers()):
        assert torch.equal(buffer, wanted), name  # non-persistent buffers are computed, not skipped
    built.normalizers = source.normalizers
    obs = raw_obs(demos)
    np.testing.assert_array_equal(built.predict_chunk(obs), source.predict_chunk(obs))
    with pytest.raises(ValueError, match="policy weights do not match"):
        VLAPolicy(source.config, source.vlm, source.processor, own_state={"queries": source.queries.detach()})
