"""Demonstrations: the robomimic/LIBERO HDF5 layout, a torch Dataset with action chunks, normalisation."""

from vla_peft.data.augment import ImageAugment
from vla_peft.data.dataset import DataConfig, DemoDataset, build_datasets, split_episodes
from vla_peft.data.errors import DemoFileError
from vla_peft.data.hdf5 import DemoFile, DemoWriter, Episode
from vla_peft.data.keys import KEY_MAPS
from vla_peft.data.stats import MODES, Normalizer, Stats, compute_stats, load_normalizers, save_normalizers

__all__ = [
    "KEY_MAPS",
    "MODES",
    "DataConfig",
    "DemoDataset",
    "DemoFile",
    "DemoFileError",
    "DemoWriter",
    "Episode",
    "ImageAugment",
    "Normalizer",
    "Stats",
    "build_datasets",
    "compute_stats",
    "load_normalizers",
    "save_normalizers",
    "split_episodes",
]
