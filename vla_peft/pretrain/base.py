"""Where the tiny pretrained base lives: shipped in the package, else cached, else built once."""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).parent / "base"
CACHE_ENV = "VLA_PEFT_BASE_CACHE"

# The exact recipe of the shipped base (a key of train.RECIPES) and the command that rebuilds it.
RECIPE, SEED = "vision-first", 0
REBUILD_COMMAND = f"vla-peft pretrain-base --out <dir> --recipe {RECIPE} --seed {SEED} --threads 1"


def cache_path() -> Path:
    """``$VLA_PEFT_BASE_CACHE``, else ``~/.cache/vla_peft/tiny_base``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vla_peft" / "tiny_base")


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "image_norm.safetensors"))


def default_base_path(build: bool = True) -> Path:
    """The tiny pretrained base: the shipped copy, else the cache, else (``build=True``) pretrain it now.

    Building takes the recipe's full pretraining time (tens of minutes on 2 CPU cores); it
    happens at most once per cache directory and resumes if interrupted.
    """
    if _complete(SHIPPED):
        return SHIPPED
    cache = cache_path()
    if _complete(cache):
        return cache
    if not build:
        raise FileNotFoundError(
            f"no tiny pretrained base in {SHIPPED} or {cache}; build it with `{REBUILD_COMMAND.replace('<dir>', str(cache))}`"
        )
    from vla_peft.pretrain.train import RECIPES, PretrainConfig, pretrain

    pretrain(cache, PretrainConfig(**RECIPES[RECIPE], seed=SEED), resume=cache.exists())
    return cache
