"""Import a local LeRobotDataset directory (v2.x or v3.0) into our HDF5 layout.

    meta/info.json           codebase_version, fps, features, data_path, video_path, chunks_size
    v3.0: meta/tasks.parquet, meta/episodes/chunk-*/file-*.parquet (episode -> data/video file and offsets),
          data/chunk-*/file-*.parquet (many episodes per file), videos/<key>/chunk-*/file-*.mp4
    v2.x: meta/tasks.jsonl, meta/episodes.jsonl,
          data/chunk-*/episode_*.parquet (one episode per file), videos/chunk-*/<key>/episode_*.mp4

Features map to our names: `action` -> actions; `observation.images.<cam>` (or any image/video
feature) -> obs/<cam>_rgb; `observation.state` -> obs/state and other numeric `observation.<x>` ->
obs/<x>; `next.reward` / `next.done` -> rewards / dones; each episode's task -> its instruction.
Needs pyarrow (the `lerobot` extra); mp4 frames are decoded with the ffmpeg of imageio-ffmpeg.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla_peft.data.errors import DemoFileError
from vla_peft.data.hdf5 import DemoWriter, Episode


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DemoFileError("importing LeRobot datasets needs pyarrow: pip install 'vla_peft[lerobot]'") from None
    return pq


def obs_name(feature: str, is_image: bool) -> str:
    """`observation.images.top` -> `top_rgb`, `observation.image` -> `image_rgb`, `observation.state` -> `state`."""
    name = feature.removeprefix("observation.").removeprefix("images.").replace(".", "_")
    return f"{name}_rgb" if is_image else name


def _column(table, name: str, where: str) -> np.ndarray:
    """A parquet column as an (N, ...) numpy array (list columns become 2-D)."""
    if name not in table.column_names:
        raise DemoFileError(f"{where}: no column '{name}'; it has {table.column_names}")
    import pyarrow as pa

    column = table.column(name).combine_chunks()
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
    return column.to_numpy(zero_copy_only=False)


class _VideoFrames:
    """Sequential RGB frames of one mp4 file; reading forward never decodes a frame twice."""

    def __init__(self, path: Path):
        self.path = path
        self._frames = None
        self._position = 0
        self._size = (0, 0)

    def _open(self) -> None:
        import imageio_ffmpeg

        if not self.path.is_file():
            raise DemoFileError(f"{self.path}: video file missing")
        self._frames = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24")
        self._size = next(self._frames)["size"]
        self._position = 0

    def read(self, start: int, count: int, where: str) -> np.ndarray:
        if self._frames is None or start < self._position:
            self._open()
        width, height = self._size
        out = np.empty((count, height, width, 3), np.uint8)
        try:
            while self._position < start:
                next(self._frames)
                self._position += 1
            for i in range(count):
                out[i] = np.frombuffer(next(self._frames), np.uint8).reshape(height, width, 3)
                self._position += 1
        except StopIteration:
            raise DemoFileError(f"{where}: video {self.path} ends before frame {start + count}") from None
        return out


def _decode_images(values: list, root: Path, where: str) -> np.ndarray:
    """Image features are stored in parquet as {bytes, path} (PNG/JPEG)."""
    from PIL import Image

    frames = []
    for value in values:
        data = value.get("bytes") if isinstance(value, dict) else value
        if data is None and isinstance(value, dict) and value.get("path"):
            data = (root / value["path"]).read_bytes()
        if data is None:
            raise DemoFileError(f"{where}: an image cell holds neither bytes nor a path")
        frames.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return np.stack(frames)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DemoFileError(f"{path}: missing; a LeRobot v2 dataset keeps it in meta/")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tasks(root: Path, version: str) -> dict[int, str]:
    if version.startswith("v2"):
        return {int(row["task_index"]): row["task"] for row in _read_jsonl(root / "meta/tasks.jsonl")}
    path = root / "meta/tasks.parquet"
    if not path.is_file():
        raise DemoFileError(f"{path}: missing; a LeRobot v3 dataset keeps its tasks there")
    table = _pyarrow().read_table(path)
    text_column = next((c for c in table.column_names if c != "task_index" and str(table.schema.field(c).type) in ("string", "large_string")), None)
    if text_column is None or "task_index" not in table.column_names:
        raise DemoFileError(f"{path}: expected a task text column and 'task_index'; found {table.column_names}")
    return dict(zip(table.column("task_index").to_pylist(), table.column(text_column).to_pylist()))


def _episodes(root: Path, version: str) -> list[dict]:
    if version.startswith("v2"):
        return _read_jsonl(root / "meta/episodes.jsonl")
    files = sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise DemoFileError(f"{root}/meta/episodes: no chunk-*/file-*.parquet; not a LeRobot v3 dataset")
    rows = []
    for path in files:
        table = _pyarrow().read_table(path)
        keep = [c for c in table.column_names if not c.startswith("stats/")]
        rows += table.select(keep).to_pylist()
    return sorted(rows, key=lambda row: row["episode_index"])


def import_lerobot(src: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Convert the LeRobot dataset at `src` into the HDF5 file `out`; return a summary dict."""
    pq = _pyarrow()
    root = Path(src)
    info_path = root / "meta/info.json"
    if not info_path.is_file():
        raise DemoFileError(f"{root}: no meta/info.json; give the root of a local LeRobotDataset (v2.1 or v3.0)")
    info = json.loads(info_path.read_text())
    version = str(info.get("codebase_version", ""))
    if not version.startswith(("v2", "v3")):
        raise DemoFileError(f"{info_path}: codebase_version {version!r} is not supported; convert it to v2.1 or v3.0 with lerobot first")
    features = info.get("features", {})
    if "action" not in features:
        raise DemoFileError(f"{info_path}: no 'action' feature; found {sorted(features)}")
    cameras = [k for k, v in features.items() if v.get("dtype") in ("image", "video")]
    states = [
        k for k, v in features.items()
        if k.startswith("observation.") and k not in cameras and str(v.get("dtype", "")).startswith(("float", "int"))
    ]
    tasks = _tasks(root, version)
    episodes = _episodes(root, version)
    chunks_size = int(info.get("chunks_size", 1000))
    fps = info.get("fps")
    videos: dict[str, _VideoFrames] = {}
    data_cache: dict[Path, object] = {}

    def video(path: Path) -> _VideoFrames:
        if path not in videos:
            videos[path] = _VideoFrames(path)
        return videos[path]

    env_args = {
        "env_name": info.get("robot_type") or root.name,
        "type": "lerobot",
        "env_kwargs": {},
        "source": str(root),
        "codebase_version": version,
        "control_hz": fps,
        "camera_names": [obs_name(k, True).removesuffix("_rgb") for k in cameras],
    }
    with DemoWriter(out, env_args) as writer:
        for row in tqdm(episodes, desc="import", unit="episode", disable=not progress):
            index = int(row["episode_index"])
            where = f"{root} episode {index}"
            if version.startswith("v2"):
                data_path = root / info["data_path"].format(episode_chunk=index // chunks_size, episode_index=index)
            else:
                data_path = root / info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
            if not data_path.is_file():
                raise DemoFileError(f"{where}: data file {data_path} is missing")
            if data_path not in data_cache:
                data_cache.clear()
                data_cache[data_path] = pq.read_table(data_path)
            table = data_cache[data_path]
            if "episode_index" in table.column_names:
                table = table.filter(np.asarray(_column(table, "episode_index", where)).reshape(-1) == index)
            steps = table.num_rows
            if steps == 0:
                raise DemoFileError(f"{where}: no rows in {data_path}")
            obs = {}
            for key in states:
                obs[obs_name(key, False)] = _column(table, key, f"{where} ({data_path.name})").astype(np.float32).reshape(steps, -1)
            for key in cameras:
                if features[key]["dtype"] == "image":
                    obs[obs_name(key, True)] = _decode_images(table.column(key).to_pylist(), root, f"{where} key '{key}'")
                elif version.startswith("v2"):
                    path = root / info["video_path"].format(episode_chunk=index // chunks_size, video_key=key, episode_index=index)
                    obs[obs_name(key, True)] = video(path).read(0, steps, f"{where} key '{key}'")
                else:
                    path = root / info["video_path"].format(
                        video_key=key, chunk_index=row[f"videos/{key}/chunk_index"], file_index=row[f"videos/{key}/file_index"]
                    )
                    start = round(float(row[f"videos/{key}/from_timestamp"]) * float(features[key].get("info", {}).get("video.fps", fps)))
                    obs[obs_name(key, True)] = video(path).read(start, steps, f"{where} key '{key}'")
            if "task_index" in table.column_names:
                instruction = tasks[int(_column(table, "task_index", where).reshape(-1)[0])]
            else:
                instruction = (row.get("tasks") or [""])[0]
            writer.add(
                Episode(
                    actions=_column(table, "action", where).astype(np.float32).reshape(steps, -1),
                    obs=obs,
                    instruction=instruction,
                    rewards=_column(table, "next.reward", where).reshape(-1) if "next.reward" in table.column_names else None,
                    dones=_column(table, "next.done", where).reshape(-1) if "next.done" in table.column_names else None,
                    attrs={"source_episode_index": index},
                )
            )
        frames, kept = writer.num_frames, writer.num_episodes
    size = Path(out).stat().st_size
    return {"episodes": kept, "frames": frames, "cameras": env_args["camera_names"], "bytes": size, "version": version}
