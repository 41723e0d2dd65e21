"""`import-lerobot`: small LeRobot v3.0 (mp4 video) and v2.1 (PNG images) directories built here import."""

import io
import json

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from vla_peft.data import DataConfig, DemoDataset, DemoFile, DemoFileError  # noqa: E402
from vla_peft.data.lerobot import import_lerobot  # noqa: E402

FPS = 10
SIZE = 32
LENGTHS = [6, 4]
TASKS = ["push the red cube", "open the drawer"]


def _colour_frames(first: int, count: int) -> np.ndarray:
    """Frames of flat, distinct colours, so lossy video still tells which frame is which."""
    frames = np.zeros((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        k = first + i
        frames[i] = ((k * 37) % 200 + 30, (k * 71) % 200 + 30, (k * 13) % 200 + 30)
    return frames


def _episode_table(episode: int, start_index: int, images=None) -> pa.Table:
    steps = LENGTHS[episode]
    rng = np.random.default_rng(episode)
    columns = {
        "action": pa.array(list(rng.normal(size=(steps, 4)).astype(np.float32)), type=pa.list_(pa.float32(), 4)),
        "observation.state": pa.array(list(rng.normal(size=(steps, 3)).astype(np.float32)), type=pa.list_(pa.float32(), 3)),
        "timestamp": pa.array(np.arange(steps, dtype=np.float32) / FPS),
        "frame_index": pa.array(np.arange(steps)),
        "episode_index": pa.array(np.full(steps, episode)),
        "index": pa.array(start_index + np.arange(steps)),
        "task_index": pa.array(np.full(steps, episode)),
        "next.done": pa.array([i == steps - 1 for i in range(steps)]),
    }
    if images is not None:
        columns["observation.images.top"] = pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return pa.table(columns)


def _features(image_dtype: str) -> dict:
    return {
        "action": {"dtype": "float32", "shape": [4], "names": None},
        "observation.state": {"dtype": "float32", "shape": [3], "names": None},
        "observation.images.top": {
            "dtype": image_dtype,
            "shape": [SIZE, SIZE, 3],
            "names": ["height", "width", "channels"],
            "info": {"video.fps": FPS, "video.codec": "h264"} if image_dtype == "video" else None,
        },
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
        "next.done": {"dtype": "bool", "shape": [1], "names": None},
    }


def make_v30_video(root):
    """Both episodes in one data parquet and one mp4, located through meta/episodes."""
    import imageio_ffmpeg

    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    (root / "data/chunk-000").mkdir(parents=True)
    (root / "videos/observation.images.top/chunk-000").mkdir(parents=True)
    info = {
        "codebase_version": "v3.0", "robot_type": "toy", "fps": FPS, "chunks_size": 1000,
        "total_episodes": 2, "total_frames": sum(LENGTHS), "total_tasks": 2,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": _features("video"),
    }
    (root / "meta/info.json").write_text(json.dumps(info))
    pq.write_table(pa.table({"task_index": [0, 1], "__index_level_0__": TASKS}), root / "meta/tasks.parquet")
    tables = [_episode_table(0, 0), _episode_table(1, LENGTHS[0])]
    pq.write_table(pa.concat_tables(tables), root / "data/chunk-000/file-000.parquet")
    frames = _colour_frames(0, sum(LENGTHS))
    writer = imageio_ffmpeg.write_frames(
        str(root / "videos/observation.images.top/chunk-000/file-000.mp4"), (SIZE, SIZE), fps=FPS, codec="libx264",
        output_params=["-crf", "0"], macro_block_size=1,
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    rows = {
        "episode_index": [0, 1], "tasks": [[TASKS[0]], [TASKS[1]]], "length": LENGTHS,
        "data/chunk_index": [0, 0], "data/file_index": [0, 0],
        "dataset_from_index": [0, LENGTHS[0]], "dataset_to_index": [LENGTHS[0], sum(LENGTHS)],
        "videos/observation.images.top/chunk_index": [0, 0], "videos/observation.images.top/file_index": [0, 0],
        "videos/observation.images.top/from_timestamp": [0.0, LENGTHS[0] / FPS],
        "videos/observation.images.top/to_timestamp": [LENGTHS[0] / FPS, sum(LENGTHS) / FPS],
    }
    pq.write_table(pa.table(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    return tables, frames


def make_v21_images(root):
    """One parquet per episode with PNG bytes in the image column; tasks and episodes as jsonl."""
    from PIL import Image

    (root / "meta").mkdir(parents=True)
    (root / "data/chunk-000").mkdir(parents=True)
    info = {
        "codebase_version": "v2.1", "robot_type": None, "fps": FPS, "chunks_size": 1000,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": None,
        "features": _features("image"),
    }
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "meta/tasks.jsonl").write_text("\n".join(json.dumps({"task_index": i, "task": t}) for i, t in enumerate(TASKS)))
    (root / "meta/episodes.jsonl").write_text(
        "\n".join(json.dumps({"episode_index": i, "tasks": [TASKS[i]], "length": n}) for i, n in enumerate(LENGTHS))
    )
    rng = np.random.default_rng(5)
    tables, all_frames = [], []
    for episode, steps in enumerate(LENGTHS):
        frames = rng.integers(0, 256, (steps, SIZE, SIZE, 3), dtype=np.uint8)
        cells = []
        for frame in frames:
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="PNG")
            cells.append({"bytes": buffer.getvalue(), "path": None})
        table = _episode_table(episode, sum(LENGTHS[:episode]), cells)
        pq.write_table(table, root / f"data/chunk-000/episode_{episode:06d}.parquet")
        tables.append(table)
        all_frames.append(frames)
    return tables, np.concatenate(all_frames)


def _check_import(out, tables, frames, exact_images: bool):
    with DemoFile(out) as f:
        assert f.demos == ["demo_0", "demo_1"]
        assert f.env_args["type"] == "lerobot" and f.env_args["camera_names"] == ["top"]
        start = 0
        for i, table in enumerate(tables):
            demo = f"demo_{i}"
            assert f.instruction(demo) == TASKS[i]
            actions = np.stack(table.column("action").to_pylist())
            np.testing.assert_array_equal(f.read(demo, "actions"), actions)
            np.testing.assert_array_equal(f.read(demo, "obs/state"), np.stack(table.column("observation.state").to_pylist()))
            np.testing.assert_array_equal(f.read(demo, "dones"), [0] * (LENGTHS[i] - 1) + [1])
            images = f.read(demo, "obs/top_rgb")
            expected = frames[start : start + LENGTHS[i]]
            assert images.shape == expected.shape and images.dtype == np.uint8
            if exact_images:
                np.testing.assert_array_equal(images, expected)
            else:  # lossy video: every frame must still be the right one, not its neighbour
                error = np.abs(images.astype(int) - expected.astype(int)).mean(axis=(1, 2, 3))
                assert error.max() < 4, error
            start += LENGTHS[i]
    dataset = DemoDataset(DataConfig(paths=[str(out)], cameras=["top"], state_keys=["state"], chunk_size=3))
    assert len(dataset) == sum(LENGTHS)
    assert dataset[0]["images"].shape == (1, 1, 3, SIZE, SIZE)


def test_import_lerobot_v30_video(tmp_path):
    tables, frames = make_v30_video(tmp_path / "src")
    summary = import_lerobot(tmp_path / "src", tmp_path / "out.hdf5", progress=False)
    assert summary["episodes"] == 2 and summary["frames"] == sum(LENGTHS) and summary["version"] == "v3.0"
    _check_import(tmp_path / "out.hdf5", tables, frames, exact_images=False)


def test_import_lerobot_v21_images_through_the_cli(tmp_path, capsys):
    from vla_peft.cli import main

    tables, frames = make_v21_images(tmp_path / "src")
    assert main(["import-lerobot", str(tmp_path / "src"), str(tmp_path / "out.hdf5")]) == 0
    assert "imported 2 episodes, 10 frames, cameras ['top'] (LeRobot v2.1)" in capsys.readouterr().out
    _check_import(tmp_path / "out.hdf5", tables, frames, exact_images=True)


def test_import_lerobot_rejects_a_directory_without_meta(tmp_path):
    with pytest.raises(DemoFileError, match="meta/info.json"):
        import_lerobot(tmp_path, tmp_path / "out.hdf5", progress=False)
    assert not (tmp_path / "out.hdf5").exists()
