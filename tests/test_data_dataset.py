"""The demonstration Dataset: statistics, normalisation, action chunks and masks, splits, multi-task, augmentation."""

import numpy as np
import pytest
import torch
from data_synth import write_synthetic
from torch.utils.data import DataLoader

from vla_peft.data import (
    DataConfig,
    DemoDataset,
    DemoFile,
    DemoFileError,
    ImageAugment,
    Normalizer,
    build_datasets,
    compute_stats,
    load_normalizers,
    save_normalizers,
    split_episodes,
)
from vla_peft.data.dataset import dataset_normalizers

LENGTHS = (5, 9, 3)


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "task_a.hdf5"
    episodes = write_synthetic(path, lengths=LENGTHS, seed=0)
    return path, episodes


def _numpy_stats(values):
    values = values.astype(np.float64)
    return {
        "mean": values.mean(0), "std": values.std(0), "min": values.min(0), "max": values.max(0),
        "q01": np.quantile(values, 0.01, axis=0), "q99": np.quantile(values, 0.99, axis=0),
    }


def test_stats_equal_numpy_stored_and_computed(demo_file, tmp_path):
    path, episodes = demo_file
    actions = np.concatenate([e.actions for e in episodes])
    state = np.concatenate([np.concatenate([e.obs["ee_pos"], e.obs["gripper_states"]], 1) for e in episodes])
    stored = dataset_normalizers(DataConfig(paths=[str(path)]))  # single file: read from the file's `stats` group
    other = tmp_path / "task_b.hdf5"
    more = write_synthetic(other, lengths=(4, 6), seed=1)
    combined = dataset_normalizers(DataConfig(paths=[str(path), str(other)]))  # several files: computed from raw arrays
    both_actions = np.concatenate([actions] + [e.actions for e in more])
    for normalizers, expected_actions, expected_state in (
        (stored, actions, state),
        (combined, both_actions, np.concatenate([state] + [np.concatenate([e.obs["ee_pos"], e.obs["gripper_states"]], 1) for e in more])),
    ):
        for name, values in (("actions", expected_actions), ("state", expected_state)):
            got = normalizers[name].stats
            assert got.count == len(values)
            for stat, reference in _numpy_stats(values).items():
                np.testing.assert_allclose(getattr(got, stat), reference, rtol=1e-12, atol=1e-12, err_msg=f"{name} {stat}")


@pytest.mark.parametrize("mode", ["q01_q99", "min_max", "mean_std", "none"])
def test_normalizer_forward_matches_formula_and_inverts(mode):
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 3.0, size=(500, 4))
    values[:, 3] = 0.5  # a constant dimension stays finite
    stats = compute_stats(values)
    normalizer = Normalizer(stats, mode)
    y = normalizer.normalize(values)
    if mode == "q01_q99":
        reference = np.clip(2 * (values - stats.q01) / (stats.q99 - stats.q01 + 1e-8) - 1, -1, 1)
    elif mode == "min_max":
        reference = 2 * (values - stats.min) / (stats.max - stats.min + 1e-8) - 1
    elif mode == "mean_std":
        reference = (values - stats.mean) / (stats.std + 1e-8)
    else:
        reference = values
    np.testing.assert_allclose(y[:, :3], reference[:, :3], rtol=1e-6, atol=1e-6)
    assert np.isfinite(y).all()
    if mode != "none":  # the constant dimension's scale is floored at 1% of its magnitude: a wobble stays small
        wobble = normalizer.normalize(values[:1] + np.array([0, 0, 0, 1e-4])) - normalizer.normalize(values[:1])
        np.testing.assert_allclose(wobble[0, 3], 1e-4 / (0.01 * 0.5), rtol=1e-4)
    inside = np.all((values >= stats.q01) & (values <= stats.q99), axis=1) if mode == "q01_q99" else slice(None)
    np.testing.assert_allclose(normalizer.unnormalize(y)[inside], values[inside], rtol=1e-6, atol=1e-6)
    tensor = torch.tensor(values, dtype=torch.float32)
    np.testing.assert_allclose(normalizer.normalize(tensor).numpy(), y, rtol=1e-4, atol=1e-4)
    if mode == "q01_q99":
        assert y.min() == -1 and y.max() == 1


def test_normalizers_save_and_load(demo_file, tmp_path):
    normalizers = dataset_normalizers(DataConfig(paths=[str(demo_file[0])]))
    save_normalizers(tmp_path / "norm.safetensors", normalizers)
    loaded = load_normalizers(tmp_path / "norm.safetensors")
    x = np.random.default_rng(0).normal(size=(7, 4))
    assert loaded["actions"].mode == "q01_q99" and loaded["state"].mode == "mean_std"
    np.testing.assert_array_equal(loaded["actions"].normalize(x), normalizers["actions"].normalize(x))


def test_action_chunks_pad_and_mask_at_episode_end(demo_file):
    path, episodes = demo_file
    dataset = DemoDataset(DataConfig(paths=[str(path)], chunk_size=4, history=3, action_norm="none", state_norm="none"))
    assert len(dataset) == sum(LENGTHS)
    last_of_first = LENGTHS[0] - 1  # frame 4 of demo_0: one real action, three padded
    sample = dataset[last_of_first]
    assert sample["frame_index"] == 4 and sample["episode_index"] == 0
    assert sample["action_mask"].tolist() == [True, False, False, False]
    actions = episodes[0].actions
    np.testing.assert_array_equal(sample["actions"].numpy(), np.repeat(actions[-1:], 4, axis=0))
    sample = dataset[2]  # frame 2: actions 2, 3, 4 then one pad
    assert sample["action_mask"].tolist() == [True, True, True, False]
    np.testing.assert_array_equal(sample["actions"].numpy(), np.concatenate([actions[2:5], actions[4:5]]))
    third = dataset[LENGTHS[0] + LENGTHS[1]]  # first frame of demo_2 (3 steps): history padded at the front
    assert third["history_mask"].tolist() == [False, False, True]
    assert third["action_mask"].tolist() == [True, True, True, False]
    first_image = torch.as_tensor(episodes[2].obs["agentview_rgb"][0]).permute(2, 0, 1).float() / 255
    for h in range(3):
        torch.testing.assert_close(third["images"][0, h], first_image)
    middle = dataset[LENGTHS[0] + 5]  # demo_1 frame 5: full history 3, 4, 5
    assert middle["history_mask"].all() and middle["action_mask"].all()
    state = np.concatenate([episodes[1].obs["ee_pos"], episodes[1].obs["gripper_states"]], 1)
    np.testing.assert_array_equal(middle["state"].numpy(), state[3:6])
    assert middle["instruction"] == episodes[1].instruction


def test_split_is_by_episode_and_reproducible(tmp_path):
    demos = [f"demo_{i}" for i in range(20)]
    train, val = split_episodes(demos, 0.2, seed=3)
    assert (train, val) == split_episodes(demos, 0.2, seed=3)
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val, key=lambda d: int(d[5:])) == demos
    assert split_episodes(demos, 0.2, seed=4)[1] != val
    path = tmp_path / "x.hdf5"
    write_synthetic(path, lengths=(3, 4, 5, 6))
    train_set, val_set = build_datasets(DataConfig(paths=[str(path)], val_fraction=0.25, split_seed=1))
    train_demos = {ep.demo for ep in train_set.episodes}
    val_demos = {ep.demo for ep in val_set.episodes}
    assert len(val_demos) == 1 and not train_demos & val_demos
    assert len(train_set) + len(val_set) == 18
    assert train_set.normalizers is val_set.normalizers


def test_multitask_dataset_combines_files(tmp_path):
    a, b = tmp_path / "reach.hdf5", tmp_path / "push.hdf5"
    write_synthetic(a, lengths=(3, 4), seed=1)
    write_synthetic(b, lengths=(5,), seed=2)
    dataset = DemoDataset(DataConfig(paths=[str(a), str(b)]))
    assert dataset.tasks == ["reach", "push"] and len(dataset) == 12
    assert [dataset[i]["task_index"] for i in (0, 6, 7, 11)] == [0, 0, 1, 1]
    small = tmp_path / "small.hdf5"
    write_synthetic(small, lengths=(3,), size=8)
    with pytest.raises(DemoFileError, match="same --image-size"):
        DemoDataset(DataConfig(paths=[str(a), str(small)]))


def test_cache_and_workers_give_the_same_samples(demo_file):
    path, _ = demo_file
    config = dict(paths=[str(path)], cameras=["agentview", "wrist"], chunk_size=3, history=2)
    streaming = DemoDataset(DataConfig(**config))
    cached = DemoDataset(DataConfig(**config, cache=True))
    for index in (0, 6, 16):
        a, b = streaming[index], cached[index]
        for key in ("images", "state", "actions", "action_mask", "history_mask"):
            torch.testing.assert_close(a[key], b[key])
    batches = [next(iter(DataLoader(streaming, batch_size=17, num_workers=w))) for w in (0, 2)]
    torch.testing.assert_close(batches[0]["images"], batches[1]["images"])
    assert batches[0]["instruction"] == batches[1]["instruction"]


def test_augmentation_random_in_training_centre_crop_in_eval(demo_file):
    path, episodes = demo_file
    train = DemoDataset(DataConfig(paths=[str(path)], augment=True, crop_scale=0.64))
    evaluation = DemoDataset(DataConfig(paths=[str(path)], augment=True, crop_scale=0.64), train=False)
    torch.manual_seed(0)
    a, b = train[0]["images"], train[0]["images"]
    assert a.shape == (1, 1, 3, 16, 16) and not torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    image = torch.as_tensor(episodes[0].obs["agentview_rgb"][0]).permute(2, 0, 1).float() / 255
    crop = image[:, 1:14, 1:14]  # 0.64 of the area = 0.8 of each side: 13 of 16 pixels, centred
    expected = torch.nn.functional.interpolate(crop[None], size=(16, 16), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(evaluation[0]["images"][0, 0], expected)
    torch.testing.assert_close(evaluation[0]["images"], evaluation[0]["images"])
    still = ImageAugment(crop_scale=1.0, brightness=0, contrast=0, saturation=0)
    torch.testing.assert_close(still.train(image), image)


def test_grounding_files_train_the_aux_targets_only(tmp_path):
    demos, play = tmp_path / "reach.hdf5", tmp_path / "play.hdf5"
    write_synthetic(demos, lengths=(3, 4, 5, 6), seed=1)
    write_synthetic(play, lengths=(4, 4), seed=2, env_args={"env_name": "synthetic", "expert": "play"})
    config = DataConfig(paths=[str(demos)], grounding_paths=[str(play)], aux_keys=["ee_pos"], val_fraction=0.25)
    train_set, val_set = build_datasets(config)
    assert {ep.file_index for ep in val_set.episodes} == {0}  # validation is demonstrations only
    assert len(train_set) == 18 - len(val_set) + 8 and train_set.tasks == ["reach", "play"]
    for i in range(len(train_set)):
        sample = train_set[i]
        assert sample["action_mask"].any() == (sample["task_index"] == 0)  # play frames: no action loss
    # the statistics are the demonstrations' alone, and a play frame's aux target is normalised by them
    alone = dataset_normalizers(DataConfig(paths=[str(demos)], aux_keys=["ee_pos"]))
    for name in ("actions", "state", "aux"):
        np.testing.assert_array_equal(train_set.normalizers[name].stats.mean, alone[name].stats.mean)
    with DemoFile(play) as f:
        raw = f.read(f.demos[0], "obs/ee_pos")[2]
    first_play = next(i for i in range(len(train_set)) if train_set[i]["task_index"] == 1)
    np.testing.assert_allclose(train_set[first_play + 2]["aux"], alone["aux"].normalize(raw), rtol=1e-6)

    with pytest.raises(ValueError, match="set aux_keys"):
        DataConfig(paths=[str(demos)], grounding_paths=[str(play)])
    with pytest.raises(ValueError, match="grounding_fraction"):
        DataConfig(paths=[str(demos)], grounding_paths=[str(play)], aux_keys=["ee_pos"], grounding_fraction=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        DataConfig(paths=[str(demos)], chunk_size=0)
    with pytest.raises(DemoFileError, match="holds play.*grounding_paths"):
        DemoDataset(DataConfig(paths=[str(demos), str(play)]))


def test_each_batch_takes_its_grounding_share_from_the_last_indices():
    from vla_peft.train.sampler import StepBatchSampler

    sampler = StepBatchSampler(30, 8, seed=0, start_step=0, total_steps=40, grounding_samples=20, grounding_per_batch=2)
    batches = [sampler.global_batch_at(step) for step in range(40)]
    assert all(len(batch) == 8 and sum(i >= 10 for i in batch) == 2 for batch in batches)
    seen = [i for batch in batches for i in batch]
    assert set(seen) == set(range(30))  # both streams go round every index
    assert [seen.count(i) for i in range(10)] == [24] * 10  # 40 steps x 6 demonstration frames, whole epochs
    two = StepBatchSampler(30, 8, seed=0, start_step=5, total_steps=6, world_size=2, rank=1,
                           grounding_samples=20, grounding_per_batch=2)
    assert [[i for i, _ in b] for b in two] == [batches[5][4:]]  # processes split the same global batch
