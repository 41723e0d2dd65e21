"""The HDF5 demonstration layout: round trip, plain-h5py readability, atomic writes, LIBERO files, bad input."""

import json
import shutil

import h5py
import numpy as np
import pytest
from data_synth import make_libero_file, synthetic_episode, write_synthetic

from vla_peft.data import DataConfig, DemoDataset, DemoFile, DemoFileError, DemoWriter


def test_round_trip_keeps_arrays_instructions_and_metadata(tmp_path):
    path = tmp_path / "demos.hdf5"
    env_args = {"env_name": "vla_peft/PickPlace-v0", "env_kwargs": {"image_size": 16}, "control_hz": 20}
    episodes = write_synthetic(path, lengths=(5, 9, 3), env_args=env_args)
    with DemoFile(path) as f:
        assert f.demos == ["demo_0", "demo_1", "demo_2"]
        assert f.env_args == env_args
        for name, written in zip(f.demos, episodes):
            read = f.episode(name)
            assert read.instruction == written.instruction
            assert read.attrs == written.attrs
            assert set(read.obs) == set(written.obs)
            for key in written.obs:
                np.testing.assert_array_equal(read.obs[key], written.obs[key])
                assert read.obs[key].dtype == written.obs[key].dtype
            for key in ("actions", "rewards", "dones"):
                np.testing.assert_array_equal(getattr(read, key), getattr(written, key))


def test_file_opens_with_plain_h5py(tmp_path):
    path = tmp_path / "demos.hdf5"
    episodes = write_synthetic(path, lengths=(4, 6))
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert data.attrs["total"] == 10
        assert json.loads(data.attrs["env_args"])["env_name"] == "synthetic"
        for i, episode in enumerate(episodes):
            demo = data[f"demo_{i}"]
            assert demo.attrs["num_samples"] == len(episode)
            assert demo.attrs["language_instruction"] == episode.instruction
            image = demo["obs/agentview_rgb"]
            assert image.dtype == np.uint8 and image.compression == "gzip" and image.chunks == (1, 16, 16, 3)
            np.testing.assert_array_equal(image[()], episode.obs["agentview_rgb"])
            np.testing.assert_array_equal(demo["actions"][()], episode.actions)
        assert set(data) == {"demo_0", "demo_1"}  # robomimic readers treat every key of `data` as a demo
        np.testing.assert_allclose(f["stats/actions/mean"][()], np.concatenate([e.actions for e in episodes]).astype(np.float64).mean(0))


def test_interrupted_writer_leaves_no_file(tmp_path):
    path = tmp_path / "demos.hdf5"
    rng = np.random.default_rng(0)
    with pytest.raises(KeyboardInterrupt):
        with DemoWriter(path, {}) as writer:
            writer.add(synthetic_episode(rng, 4))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_unfinished_file_does_not_load(tmp_path):
    """Even under the final name (e.g. a killed writer's temporary file renamed by hand) it is refused."""
    path = tmp_path / "demos.hdf5"
    writer = DemoWriter(path, {})
    writer.add(synthetic_episode(np.random.default_rng(0), 4))
    writer._file.flush()
    shutil.copy(writer._tmp, path)
    writer.abort()
    with pytest.raises(DemoFileError, match="never finished"):
        DemoFile(path)


def test_libero_named_file_loads_through_the_key_map(tmp_path):
    path = tmp_path / "libero.hdf5"
    arrays = make_libero_file(path)
    config = DataConfig(
        paths=[str(path)], cameras=["agentview", "wrist"], state_keys=["ee_pos", "gripper_states", "joint_states"],
        chunk_size=3, action_norm="none", state_norm="none",
    )
    dataset = DemoDataset(config)
    assert len(dataset) == 12
    sample = dataset[6]  # demo_1, frame 1
    assert sample["instruction"] == "pick up the black bowl"
    item = arrays[1]
    np.testing.assert_allclose(sample["images"][1, 0].permute(1, 2, 0).numpy() * 255, item["eye_in_hand_rgb"][1], atol=1e-3)
    np.testing.assert_allclose(
        sample["state"][0].numpy(), np.concatenate([item["ee_pos"][1], item["gripper_states"][1], item["joint_states"][1]]), rtol=1e-6
    )
    np.testing.assert_allclose(sample["actions"].numpy(), item["actions"][1:4], rtol=1e-6)
    with pytest.raises(DemoFileError, match="wrist_rgb"):
        DemoDataset(DataConfig(paths=[str(path)], cameras=["wrist"], key_map="vla_peft"))


def test_libero_images_downsample_to_the_bases_size(tmp_path):
    """LIBERO ships 128 x 128 frames; ``image_size`` resizes them on reading (antialiased, as PIL's
    bilinear resize does), so the official file trains unchanged at the tiny base's size."""
    from PIL import Image

    path = tmp_path / "libero.hdf5"
    arrays = make_libero_file(path, size=32)
    config = DataConfig(paths=[str(path)], cameras=["agentview", "wrist"], chunk_size=3, image_size=16)
    sample = DemoDataset(config)[6]  # demo_1, frame 1
    assert sample["images"].shape == (2, 1, 3, 16, 16)
    for camera, key in enumerate(("agentview_rgb", "eye_in_hand_rgb")):
        expected = np.asarray(Image.fromarray(arrays[1][key][1]).resize((16, 16), Image.BILINEAR), np.float32)
        np.testing.assert_allclose(sample["images"][camera, 0].permute(1, 2, 0).numpy() * 255, expected, atol=2.0)
    with pytest.raises(ValueError, match="image_size"):
        DataConfig(paths=[str(path)], image_size=0)


# ---- bad input: one clear error naming the demo and the key -------------------------------------------


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.hdf5"
    write_synthetic(path, lengths=(4, 5))
    return path


def _load(path):
    return DemoDataset(DataConfig(paths=[str(path)], cameras=["agentview", "wrist"]))


def test_missing_key_names_demo_and_key(good_file):
    with h5py.File(good_file, "a") as f:
        del f["data/demo_1/obs/wrist_rgb"]
    with pytest.raises(DemoFileError, match=r"demo_1 has no key 'obs/wrist_rgb'"):
        _load(good_file)


def test_ragged_lengths_name_demo_and_key(good_file):
    with h5py.File(good_file, "a") as f:
        state = f["data/demo_1/obs/ee_pos"][()]
        del f["data/demo_1/obs/ee_pos"]
        f["data/demo_1/obs/ee_pos"] = state[:-1]
    with pytest.raises(DemoFileError, match=r"demo_1: ragged lengths, 'obs/ee_pos' has 4 steps but 'actions' has 5"):
        _load(good_file)


def test_truncated_file_is_reported(good_file):
    size = good_file.stat().st_size
    with open(good_file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DemoFileError, match="truncated or corrupt"):
        _load(good_file)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda img: img.astype(np.float32) / 255, r"demo_0: image 'obs/agentview_rgb' has dtype float32; expected uint8"),
        (lambda img: img.transpose(0, 3, 1, 2).copy(), r"demo_0: image 'obs/agentview_rgb' has shape \(4, 3, 16, 16\); expected \(T, H, W, 3\)"),
    ],
    ids=["dtype", "channels_first"],
)
def test_wrong_image_dtype_or_shape_names_demo_and_key(good_file, bad, message):
    with h5py.File(good_file, "a") as f:
        image = f["data/demo_0/obs/agentview_rgb"][()]
        del f["data/demo_0/obs/agentview_rgb"]
        f["data/demo_0/obs/agentview_rgb"] = bad(image)
    with pytest.raises(DemoFileError, match=message):
        _load(good_file)


def test_writer_refuses_ragged_episode(tmp_path):
    episode = synthetic_episode(np.random.default_rng(0), 5)
    episode.obs["wrist_rgb"] = episode.obs["wrist_rgb"][:3]
    with pytest.raises(DemoFileError, match=r"episode 0 \(to be demo_0\): ragged lengths, 'obs/wrist_rgb' has 3 steps"):
        with DemoWriter(tmp_path / "x.hdf5", {}) as writer:
            writer.add(episode)
    assert list(tmp_path.iterdir()) == []
