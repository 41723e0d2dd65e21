"""A torch Dataset over one or more demonstration files: images, state, instruction, action chunk.

Every frame t of every episode is one sample. Low-dimensional arrays (actions, state) are
read once and held normalised in memory; camera images stream from the HDF5 file (each
worker process opens its own handle) unless `cache` loads them all up front.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vla_peft.data.augment import ImageAugment, resize, to_float_chw
from vla_peft.data.errors import DemoFileError
from vla_peft.data.hdf5 import DemoFile
from vla_peft.data.stats import Normalizer, Stats, compute_stats
from vla_peft.typed_config import check_values


@dataclass
class DataConfig:
    """What to read from which files, and how to shape each sample."""

    paths: list[str]
    cameras: list[str] = field(default_factory=lambda: ["agentview"])
    state_keys: list[str] = field(default_factory=lambda: ["ee_pos", "gripper_states"])
    aux_keys: list[str] = field(default_factory=list)  # training-only targets (e.g. target_pos), see PolicyConfig
    # files whose frames train only the aux targets, never the actions (e.g. `vla-peft collect --play`):
    # more scenes for the grounding without more demonstrations, as RT-2 co-trains on VQA data
    grounding_paths: list[str] = field(default_factory=list)
    grounding_fraction: float = 0.5  # share of each training batch drawn from grounding_paths
    key_map: str | dict[str, str] = "auto"
    chunk_size: int = 8
    history: int = 1
    action_norm: str = "q01_q99"
    state_norm: str = "mean_std"
    val_fraction: float = 0.1
    split_seed: int = 0
    cache: bool = False
    # resize camera images to this side on reading (LIBERO's files are 128 x 128; the tiny base takes 64):
    # the file trains unchanged and the policy is then evaluated at this size. None: the file's size
    image_size: int | None = None
    augment: bool = False
    crop_scale: float = 0.9

    def __post_init__(self) -> None:
        vars(self).update(check_values(DataConfig, dict(vars(self)), "data"))
        if not self.paths:
            raise ValueError("DataConfig.paths is empty: give at least one demonstration file")
        if self.grounding_paths and not self.aux_keys:
            raise ValueError("DataConfig.grounding_paths train only the aux targets: set aux_keys (e.g. [target_pos]) "
                             "or drop grounding_paths")
        if not 0 < self.grounding_fraction < 1:
            raise ValueError(f"grounding_fraction must be in (0, 1), got {self.grounding_fraction}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"DataConfig.image_size must be a positive side in pixels or None, got {self.image_size}")
        if self.chunk_size < 1 or self.history < 1:
            raise ValueError(f"chunk_size and history must be >= 1, got {self.chunk_size} and {self.history}")

    @property
    def all_paths(self) -> list[str]:
        """Demonstration files first, then grounding-only files (file index = position here)."""
        return [*self.paths, *self.grounding_paths]

    def is_demonstrations(self, file_index: int) -> bool:
        """Whether file `file_index` of `all_paths` trains actions (a `paths` file), not only aux targets."""
        return file_index < len(self.paths)


def split_episodes(demos: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split episode names into (train, val), the same for the same seed; val is never empty if asked for
    and there are at least two episodes."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(demos))
    n_val = round(len(demos) * val_fraction)
    if val_fraction > 0 and len(demos) >= 2:
        n_val = max(1, n_val)
    val = {demos[i] for i in order[:n_val]}
    return [d for d in demos if d not in val], [d for d in demos if d in val]


@dataclass
class _Episode:
    file_index: int
    demo: str
    length: int
    instruction: str
    actions: np.ndarray  # (T, A) normalised
    state: np.ndarray  # (T, S) normalised
    aux: np.ndarray  # (T, X) normalised


class DemoDataset(Dataset):
    """Samples of one or more demonstration files (each file one task).

    A sample is a dict:
      images        float32 (cameras, history, 3, H, W) in [0, 1] (H = W = config.image_size when set)
      state         float32 (history, S)   normalised concatenation of `state_keys`
      history_mask  bool (history,)        False for frames before the episode's start (copies of frame 0)
      actions       float32 (chunk, A)     normalised actions t .. t+chunk-1
      action_mask   bool (chunk,)          False past the episode's end (padded with its last action),
                                           and everywhere for frames of `grounding_paths`
      aux           float32 (X,)           normalised `aux_keys` at the current frame (X = 0 without them)
      instruction   str
      task_index, episode_index, frame_index   int
    """

    def __init__(
        self,
        config: DataConfig,
        episodes: list[list[str]] | None = None,
        train: bool = True,
        normalizers: dict[str, Normalizer] | None = None,
    ):
        self.config = config
        self.train = train
        self.augment = ImageAugment(crop_scale=config.crop_scale) if config.augment else None
        self.image_keys = [f"{camera}_rgb" for camera in config.cameras]
        self.tasks = [Path(path).stem for path in config.all_paths]
        self._file_keys: list[dict[str, str]] = []
        raw: list[tuple[int, str, int, str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.image_shape = None
        self.action_dim = None
        for file_index, path in enumerate(config.all_paths):
            with DemoFile(path) as demo_file:
                keys = demo_file.resolve(self.image_keys + list(config.state_keys) + list(config.aux_keys), config.key_map)
                if config.is_demonstrations(file_index) and demo_file.env_args.get("expert") == "play":
                    raise DemoFileError(f"{path} holds play, not demonstrations: its actions are not the task's; "
                                        "list it under data.grounding_paths")
                chosen = demo_file.demos if episodes is None else episodes[file_index]
                demo_file.check(keys, chosen)
                self._check_consistent(demo_file, keys, chosen[0] if chosen else None)
                self._file_keys.append(keys)
                for demo in chosen:
                    actions, state = read_low_dim(demo_file, demo, keys, config.state_keys)
                    aux = read_columns(demo_file, demo, keys, config.aux_keys, len(actions))
                    raw.append((file_index, demo, len(actions), demo_file.instruction(demo), actions, state, aux))
        self.normalizers = normalizers or dataset_normalizers(config, self._file_keys)
        norm = self.normalizers
        self.episodes = [
            _Episode(f, d, n, text, norm["actions"].normalize(a), norm["state"].normalize(s),
                     norm["aux"].normalize(x) if "aux" in norm else x)
            for f, d, n, text, a, s, x in raw
        ]
        self._starts = np.cumsum([0] + [ep.length for ep in self.episodes])
        self._handles: dict[int, DemoFile] = {}
        self._image_datasets: dict = {}
        self._pid = os.getpid()
        self._images: list[dict[str, np.ndarray]] | None = None
        if config.cache:
            self._images = [
                {key: self._file(ep.file_index).read(ep.demo, f"obs/{self._file_keys[ep.file_index][key]}") for key in self.image_keys}
                for ep in self.episodes
            ]
            self.close()

    def _check_consistent(self, demo_file: DemoFile, keys: dict[str, str], demo: str | None) -> None:
        """All files of one dataset must share the action size and the image size."""
        if demo is None:
            return
        action_dim = demo_file.shape(demo, "actions")[1]
        shapes = {demo_file.shape(demo, f"obs/{keys[k]}")[1:] for k in self.image_keys}
        if len(shapes) > 1:
            raise DemoFileError(f"{demo_file.path}: {demo} cameras {self.image_keys} differ in size {shapes}; use one image size")
        image_shape = shapes.pop() if shapes else None
        if self.action_dim is not None and action_dim != self.action_dim:
            raise DemoFileError(
                f"{demo_file.path}: {demo} key 'actions' has {action_dim} dims but {self.config.paths[0]} has {self.action_dim}; "
                "a multi-task dataset needs one action space"
            )
        if self.image_shape is not None and image_shape != self.image_shape:
            raise DemoFileError(
                f"{demo_file.path}: {demo} images are {image_shape} but {self.config.paths[0]} has {self.image_shape}; "
                "collect every task with the same --image-size"
            )
        self.action_dim, self.image_shape = action_dim, image_shape

    def _file(self, file_index: int) -> DemoFile:
        if self._pid != os.getpid():  # forked into a DataLoader worker: HDF5 handles must not be shared
            self._handles, self._image_datasets, self._pid = {}, {}, os.getpid()
        if file_index not in self._handles:
            self._handles[file_index] = DemoFile(self.config.all_paths[file_index])
        return self._handles[file_index]

    def _read_frames(self, episode_number: int, key: str, rows: slice) -> np.ndarray:
        """Image rows of one episode; h5py dataset objects are kept, as looking them up costs more than reading."""
        if self._images is not None:
            return self._images[episode_number][key][rows]
        ep = self.episodes[episode_number]
        handle = self._file(ep.file_index)
        dataset = self._image_datasets.get((episode_number, key))
        if dataset is None:
            name = f"obs/{self._file_keys[ep.file_index][key]}"
            dataset = self._image_datasets[(episode_number, key)] = handle.dataset(ep.demo, name)
        return dataset[rows]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles, self._image_datasets = {}, {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}, "_image_datasets": {}}

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def grounding_samples(self) -> int:
        """Frames of `grounding_paths`: the last indices, as their files come after the demonstrations."""
        return sum(ep.length for ep in self.episodes if not self.config.is_demonstrations(ep.file_index))

    def locate(self, index: int) -> tuple[int, int]:
        """(episode number, frame) of a flat sample index."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        episode = int(np.searchsorted(self._starts, index, side="right")) - 1
        return episode, index - int(self._starts[episode])

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Sample ``index``; an ``(index, draw_seed)`` pair (the training sampler's) seeds its augmentation."""
        index, draw_seed = index if isinstance(index, tuple) else (index, None)
        generator = None if draw_seed is None or self.augment is None else torch.Generator().manual_seed(draw_seed)
        episode_number, t = self.locate(index)
        ep = self.episodes[episode_number]
        history, chunk = self.config.history, self.config.chunk_size
        first = max(0, t - history + 1)
        pad_front = history - (t + 1 - first)
        last = min(ep.length, t + chunk)
        pad_back = chunk - (last - t)

        cameras = []
        for key in self.image_keys:
            frames = self._read_frames(episode_number, key, slice(first, t + 1))
            frames = np.concatenate([np.repeat(frames[:1], pad_front, axis=0), frames]) if pad_front else frames
            images = to_float_chw(frames)
            if self.config.image_size is not None and images.shape[-2:] != (self.config.image_size,) * 2:
                images = resize(images, self.config.image_size, self.config.image_size).clamp_(0.0, 1.0)
            if self.augment is not None:
                images = self.augment.train(images, generator) if self.train else self.augment.eval(images)
            cameras.append(images)

        state = ep.state[first : t + 1]
        actions = ep.actions[t:last]
        return {
            "images": torch.stack(cameras),
            "state": torch.from_numpy(np.concatenate([np.repeat(state[:1], pad_front, axis=0), state])),
            "history_mask": torch.arange(history) >= pad_front,
            "actions": torch.from_numpy(np.concatenate([actions, np.repeat(actions[-1:], pad_back, axis=0)])),
            "action_mask": (torch.arange(chunk) < chunk - pad_back) & self.config.is_demonstrations(ep.file_index),
            "aux": torch.from_numpy(ep.aux[t]),
            "instruction": ep.instruction,
            "task_index": ep.file_index,
            "episode_index": episode_number,
            "frame_index": t,
        }


def dataset_normalizers(config: DataConfig, file_keys: list[dict[str, str]] | None = None) -> dict[str, Normalizer]:
    """Normalisers for `actions`, `state` and, when aux keys are set, `aux` (mean/std) from every demo of every file.

    A single file that stores statistics (ours do) is not read again; otherwise the raw
    arrays are read and reduced with numpy, so quantiles are exact across files.
    """
    groups = {"state": list(config.state_keys)}
    if config.aux_keys:
        groups["aux"] = list(config.aux_keys)
    names = [name for group in groups.values() for name in group]
    stats = None
    if len(config.paths) == 1:
        with DemoFile(config.paths[0]) as demo_file:
            keys = file_keys[0] if file_keys else demo_file.resolve(names, config.key_map)
            stored = demo_file.stored_stats()
            if "actions" in stored and all(group and all(f"obs/{keys[k]}" in stored for k in group) for group in groups.values()):
                stats = {"actions": stored["actions"]}
                stats.update({name: Stats.concat([stored[f"obs/{keys[k]}"] for k in group]) for name, group in groups.items()})
    if stats is None:
        raw: dict[str, list[np.ndarray]] = {"actions": [], **{name: [] for name in groups}}
        for file_index, path in enumerate(config.paths):
            with DemoFile(path) as demo_file:
                keys = file_keys[file_index] if file_keys else demo_file.resolve(names, config.key_map)
                for demo in demo_file.demos:
                    actions = demo_file.read(demo, "actions").astype(np.float32)
                    raw["actions"].append(actions)
                    for name, group in groups.items():
                        raw[name].append(read_columns(demo_file, demo, keys, group, len(actions)))
        stats = {name: compute_stats(np.concatenate(parts)) for name, parts in raw.items()}
    modes = {"actions": config.action_norm, "state": config.state_norm, "aux": "mean_std"}
    return {name: Normalizer(value, modes[name]) for name, value in stats.items()}


def read_low_dim(demo_file: DemoFile, demo: str, keys: dict[str, str], state_keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Raw float32 actions (T, A) and state (T, S): the state keys side by side, in the given order."""
    actions = demo_file.read(demo, "actions").astype(np.float32)
    return actions, read_columns(demo_file, demo, keys, state_keys, len(actions))


def read_columns(demo_file: DemoFile, demo: str, keys: dict[str, str], names: list[str], length: int) -> np.ndarray:
    """The observations ``names`` side by side as float32 (T, total size); (T, 0) for no names."""
    parts = [demo_file.read(demo, f"obs/{keys[k]}").reshape(length, -1) for k in names]
    return (np.concatenate(parts, axis=1) if parts else np.zeros((length, 0))).astype(np.float32)


def build_datasets(config: DataConfig) -> tuple[DemoDataset, DemoDataset | None]:
    """Train and validation datasets split by episode within each demonstration file (grounding-only
    files all train); both share one set of normalisers, from the demonstrations."""
    train_demos, val_demos = [], []
    for file_index, path in enumerate(config.all_paths):
        with DemoFile(path) as demo_file:
            if config.is_demonstrations(file_index):
                train, val = split_episodes(demo_file.demos, config.val_fraction, config.split_seed)
            else:
                train, val = demo_file.demos, []
        train_demos.append(train)
        val_demos.append(val)
    normalizers = dataset_normalizers(config)
    train_set = DemoDataset(config, train_demos, train=True, normalizers=normalizers)
    val_set = DemoDataset(config, val_demos, train=False, normalizers=normalizers) if any(val_demos) else None
    return train_set, val_set
