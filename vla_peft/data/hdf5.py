"""Demonstration files in the robomimic / LIBERO HDF5 layout: one writer, one reader.

    data                      attrs: total, env_args (JSON), vla_peft_version, vla_peft_complete
                                     [problem_info (JSON, LIBERO) when every demo shares one instruction]
    data/demo_<i>             attrs: num_samples, language_instruction, [seed, success, ...]
    data/demo_<i>/actions     (T, A) float32
    data/demo_<i>/obs/<key>   (T, H, W, 3) uint8 for `*_rgb` cameras (chunked, gzip); (T, D) float32 states
    data/demo_<i>/rewards     (T,) float32
    data/demo_<i>/dones       (T,) uint8
    stats/<key>/<stat>        normalisation statistics of `actions` and `obs/<state key>` (see stats.py)

Files open with plain h5py. The writer fills a temporary file and renames it only when
finished, so an interrupted run never leaves a file under the final name.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vla_peft.data.errors import DemoFileError
from vla_peft.data.keys import resolve_key_map
from vla_peft.data.stats import Stats, compute_stats

FORMAT_VERSION = "0.1.0"
COMPLETE_ATTR = "vla_peft_complete"
VERSION_ATTR = "vla_peft_version"
IMAGE_SUFFIXES = ("_rgb", "_image")


def is_image_key(name: str) -> bool:
    """Camera observations are named `<camera>_rgb` (ours, LIBERO) or `<camera>_image` (robomimic)."""
    return name.endswith(IMAGE_SUFFIXES)


@dataclass
class Episode:
    """One demonstration: T steps of observations, the action taken at each, and its instruction."""

    actions: np.ndarray
    obs: dict[str, np.ndarray]
    instruction: str
    rewards: np.ndarray | None = None
    dones: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)


def check_arrays(
    where: str,
    actions_shape: tuple,
    obs: dict[str, tuple[tuple, np.dtype]],
    extra: dict[str, tuple],
    image_keys: set[str] | None = None,
) -> None:
    """Raise DemoFileError naming `where` and the key when lengths, dtypes or image shapes are wrong.

    Takes shapes and dtypes, not arrays, so a file can be checked without reading its data.
    `image_keys` defaults to the keys named like cameras (`*_rgb`, `*_image`).
    """
    if image_keys is None:
        image_keys = {key for key in obs if is_image_key(key)}
    if len(actions_shape) != 2:
        raise DemoFileError(f"{where}: 'actions' has shape {actions_shape}; expected (T, action_dim)")
    steps = actions_shape[0]
    for key, (shape, dtype) in obs.items():
        if len(shape) == 0 or shape[0] != steps:
            raise DemoFileError(
                f"{where}: ragged lengths, 'obs/{key}' has {shape[0] if shape else 0} steps but 'actions' has {steps}; "
                "every array of a demo needs one row per step"
            )
        if key in image_keys:
            if dtype != np.uint8:
                raise DemoFileError(f"{where}: image 'obs/{key}' has dtype {dtype}; expected uint8 (0-255 RGB)")
            if len(shape) != 4 or shape[-1] != 3:
                raise DemoFileError(
                    f"{where}: image 'obs/{key}' has shape {shape}; expected (T, H, W, 3) RGB, channels last"
                )
    for key, shape in extra.items():
        if shape[0] != steps:
            raise DemoFileError(f"{where}: ragged lengths, '{key}' has {shape[0]} steps but 'actions' has {steps}")


def _atomic_partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete the temporary files of earlier writes to ``path`` whose process is gone (killed with
    ``kill -9`` or a power cut, so nothing could clean up); a live writer's file is left alone."""
    removed = []
    for partial in path.parent.glob(f".{path.name}.partial-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            partial.unlink(missing_ok=True)
            removed.append(partial)
            print(f"removed {partial}, left by a killed write (process {pid} is gone)", file=sys.stderr)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class DemoWriter:
    """Write episodes to a new demonstration file; it appears under `path` only once `close()` succeeds.

    Use as a context manager: an exception (Ctrl-C included) deletes the temporary file.
    """

    def __init__(self, path: str | Path, env_args: dict, compression_level: int = 4):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.path)
        self._tmp = _atomic_partial_name(self.path)
        self._file = h5py.File(self._tmp, "w")
        self._data = self._file.create_group("data")
        self._data.attrs["env_args"] = json.dumps(env_args)
        self._data.attrs[VERSION_ATTR] = FORMAT_VERSION
        self._data.attrs[COMPLETE_ATTR] = False
        self._level = compression_level
        self._instructions: set[str] = set()
        self.num_episodes = 0
        self.num_frames = 0

    def add(self, episode: Episode) -> str:
        """Append one episode as `data/demo_<i>` and return that name."""
        name = f"demo_{self.num_episodes}"
        actions = np.asarray(episode.actions, dtype=np.float32)
        steps = len(actions)
        rewards = np.zeros(steps, np.float32) if episode.rewards is None else np.asarray(episode.rewards, np.float32)
        if episode.dones is None:
            dones = np.zeros(steps, np.uint8)
            dones[-1:] = 1
        else:
            dones = np.asarray(episode.dones, np.uint8)
        obs = {key: np.asarray(value) for key, value in episode.obs.items()}
        check_arrays(
            f"episode {self.num_episodes} (to be {name})",
            actions.shape,
            {key: (value.shape, value.dtype) for key, value in obs.items()},
            {"rewards": rewards.shape, "dones": dones.shape},
        )
        group = self._data.create_group(name)
        group.attrs["num_samples"] = steps
        group.attrs["language_instruction"] = episode.instruction
        for key, value in episode.attrs.items():
            group.attrs[key] = value
        group.create_dataset("actions", data=actions)
        group.create_dataset("rewards", data=rewards)
        group.create_dataset("dones", data=dones)
        obs_group = group.create_group("obs")
        for key, value in obs.items():
            if is_image_key(key):
                obs_group.create_dataset(
                    key, data=value, chunks=(1, *value.shape[1:]), compression="gzip", compression_opts=self._level
                )
            else:
                obs_group.create_dataset(key, data=value.astype(np.float32) if value.dtype == np.float64 else value)
        self._instructions.add(episode.instruction)
        self.num_episodes += 1
        self.num_frames += steps
        return name

    def close(self) -> Path:
        """Write totals and statistics, mark the file complete, and move it to its final name."""
        if self.num_episodes == 0:
            self.abort()
            raise DemoFileError(f"{self.path}: no episodes to write (nothing was kept); the file was not created")
        self._data.attrs["total"] = self.num_frames
        if len(self._instructions) == 1:
            self._data.attrs["problem_info"] = json.dumps({"language_instruction": next(iter(self._instructions))})
        write_stats(self._file, _stats_of_file(self._data))
        self._data.attrs[COMPLETE_ATTR] = True
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._file.id.valid:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DemoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _demo_sort_key(name: str) -> tuple:
    match = re.fullmatch(r"demo_(\d+)", name)
    return (0, int(match.group(1))) if match else (1, name)


def _stats_of_file(data: h5py.Group) -> dict[str, Stats]:
    """Statistics of actions and every non-image observation over all demos of a file."""
    demos = sorted((name for name in data if name.startswith("demo")), key=_demo_sort_key)
    keys = ["actions"] + [f"obs/{key}" for key in data[demos[0]]["obs"] if not is_image_key(key)]
    return {key: compute_stats(np.concatenate([data[demo][key][()] for demo in demos])) for key in keys}


def write_stats(file: h5py.File, stats: dict[str, Stats]) -> None:
    """Store statistics under `stats/<key>/<stat>` at the file's root (robomimic readers list `data` as demos only)."""
    root = file.require_group("stats")
    for key, value in stats.items():
        group = root.require_group(key)
        for stat, array in value.as_dict().items():
            group.create_dataset(stat, data=array)
        group.attrs["count"] = value.count


class DemoFile:
    """Read one demonstration file (ours, robomimic or LIBERO) through a key map.

    Observation keys are asked for by our names (`agentview_rgb`, `wrist_rgb`, `ee_pos`,
    `gripper_states`, ...) and read under the names the key map gives them in the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DemoFileError(f"{self.path}: no such demonstration file")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as error:
            raise DemoFileError(
                f"{self.path}: cannot be opened as HDF5 ({error}); the file is truncated or corrupt, collect or copy it again"
            ) from None
        if "data" not in self.file:
            self.close()
            raise DemoFileError(f"{self.path}: no 'data' group; not a robomimic/LIBERO demonstration file")
        self.data = self.file["data"]
        attrs = self.data.attrs
        if VERSION_ATTR in attrs and not bool(attrs.get(COMPLETE_ATTR, False)):
            self.close()
            raise DemoFileError(f"{self.path}: the writer never finished this file (interrupted?); collect it again")
        self.demos = sorted((name for name in self.data if name.startswith("demo")), key=_demo_sort_key)
        if not self.demos:
            self.close()
            raise DemoFileError(f"{self.path}: 'data' holds no demo_<i> groups")
        self.env_args = json.loads(attrs["env_args"]) if "env_args" in attrs else {}

    def _demo(self, demo: str) -> h5py.Group:
        if demo not in self.data:
            raise DemoFileError(f"{self.path}: no demo {demo!r}; it has {self.demos[:5]}...")
        return self.data[demo]

    def dataset(self, demo: str, key: str) -> h5py.Dataset:
        """The h5py dataset `key` of `demo`, or one DemoFileError naming both."""
        group = self._demo(demo)
        if key not in group:
            raise DemoFileError(f"{self.path}: {demo} has no key '{key}'; it has {_list_keys(group)}")
        return group[key]

    def obs_keys(self, demo: str | None = None) -> list[str]:
        """Observation names stored in the file (the file's own names)."""
        return list(self.dataset(demo or self.demos[0], "obs").keys())

    def resolve(self, wanted: list[str], key_map: str | dict[str, str] = "auto") -> dict[str, str]:
        """Map our observation names to this file's; see keys.resolve_key_map."""
        return resolve_key_map(key_map, wanted, set(self.obs_keys()), f"{self.path} ({self.demos[0]})")

    def num_samples(self, demo: str) -> int:
        return int(self.dataset(demo, "actions").shape[0])

    def shape(self, demo: str, key: str) -> tuple[int, ...]:
        return tuple(self.dataset(demo, key).shape)

    def instruction(self, demo: str) -> str:
        """The demo's `language_instruction`, else LIBERO's file-wide `problem_info` JSON."""
        group = self._demo(demo)
        if "language_instruction" in group.attrs:
            return _text(group.attrs["language_instruction"])
        if "problem_info" in self.data.attrs:
            value = json.loads(self.data.attrs["problem_info"]).get("language_instruction", "")
            text = " ".join(value) if isinstance(value, list) else str(value)
            return text.strip().strip('"')
        raise DemoFileError(
            f"{self.path}: {demo} has no 'language_instruction' attribute and 'data' has no 'problem_info'; "
            "add the instruction as an attribute of the demo group"
        )

    def read(self, demo: str, key: str, rows: slice | None = None) -> np.ndarray:
        """Read `actions`, `rewards`, `dones` or `obs/<file key>` of a demo (all rows or a slice)."""
        dataset = self.dataset(demo, key)
        try:
            values = dataset[()] if rows is None else dataset[rows]
        except OSError as error:
            raise DemoFileError(f"{self.path}: {demo} key '{key}' cannot be read ({error}); the file is corrupt") from None
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            first = (rows.start or 0) if rows is not None else 0
            row = first + int(np.argwhere(~np.isfinite(np.atleast_1d(values)))[0][0])
            raise DemoFileError(f"{self.path}: {demo} key '{key}' holds NaN or inf (first at row {row}); "
                                "fix the recording or drop that demo from the file")
        return values

    def check(self, obs_names: dict[str, str], demos: list[str] | None = None) -> None:
        """Check each demo has `actions` and the mapped observations with matching lengths and valid images.

        `obs_names` maps our names to file names (from `resolve`). Reads shapes only.
        """
        image_shape = None
        for demo in demos or self.demos:
            actions = self.dataset(demo, "actions")
            obs = {}
            for ours, theirs in obs_names.items():
                dataset = self.dataset(demo, f"obs/{theirs}")
                obs[theirs] = (dataset.shape, dataset.dtype)
            group = self._demo(demo)
            extra = {key: group[key].shape for key in ("rewards", "dones") if key in group}
            image_keys = {theirs for ours, theirs in obs_names.items() if is_image_key(ours)}
            check_arrays(f"{self.path}: {demo}", actions.shape, obs, extra, image_keys)
            if "num_samples" in group.attrs and int(group.attrs["num_samples"]) != actions.shape[0]:
                raise DemoFileError(
                    f"{self.path}: {demo} attribute num_samples={int(group.attrs['num_samples'])} but 'actions' has {actions.shape[0]} rows"
                )
            for ours, theirs in obs_names.items():
                if is_image_key(ours):
                    shape = obs[theirs][0][1:]
                    if image_shape is not None and shape != image_shape:
                        raise DemoFileError(
                            f"{self.path}: {demo} image 'obs/{theirs}' is {shape} but earlier demos are {image_shape}; "
                            "all images of a dataset must share one size"
                        )
                    image_shape = shape

    def stored_stats(self) -> dict[str, Stats]:
        """Statistics stored by the writer (empty for files from elsewhere)."""
        if "stats" not in self.file:
            return {}
        out = {}
        for key in _walk_stats(self.file["stats"]):
            group = self.file["stats"][key]
            out[key] = Stats(**{stat: group[stat][()] for stat in Stats.NAMES}, count=int(group.attrs["count"]))
        return out

    def episode(self, demo: str) -> Episode:
        """Everything stored for one demo, under the file's own key names."""
        group = self._demo(demo)
        attrs = {key: _plain(value) for key, value in group.attrs.items() if key not in ("num_samples", "language_instruction")}
        return Episode(
            actions=self.read(demo, "actions"),
            obs={key: self.read(demo, f"obs/{key}") for key in self.obs_keys(demo)},
            instruction=self.instruction(demo),
            rewards=self.read(demo, "rewards") if "rewards" in group else None,
            dones=self.read(demo, "dones") if "dones" in group else None,
            attrs=attrs,
        )

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> DemoFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _walk_stats(group: h5py.Group, prefix: str = "") -> list[str]:
    """Keys like `actions` or `obs/ee_pos` under the stats group (a key is a group holding `mean`)."""
    keys = []
    for name, item in group.items():
        if isinstance(item, h5py.Group):
            keys += [prefix + name] if "mean" in item else _walk_stats(item, prefix + name + "/")
    return keys


def _list_keys(group: h5py.Group) -> list[str]:
    keys = []
    group.visit(lambda name: keys.append(name) if isinstance(group[name], h5py.Dataset) else None)
    return keys


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value):
    """HDF5 attribute values back as Python scalars where they were scalars."""
    if isinstance(value, np.generic):
        return value.item()
    return _text(value) if isinstance(value, (bytes, str)) else value
