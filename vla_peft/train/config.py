"""A training run's configuration: policy, PEFT method, data and optimisation, from one YAML file.

The YAML has four sections (``policy``, ``method``, ``data``, ``train``); ``key=value``
overrides address them with dotted names (``train.steps=500``, ``method.r=8``).
``method`` is a path to a PEFT config (``configs/peft/lora.yaml``), an inline mapping,
or ``none`` for head-only training; ``method=<path>`` on the command line swaps it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from vla_peft.policy.config import PolicyConfig
from vla_peft.typed_config import build_config, check_keys, check_values, read_yaml_mapping

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``batch_size`` is the global batch per optimiser step
    (split over processes and accumulation micro-steps), so results do not depend on
    how many processes run it."""

    output_dir: str = "runs/run"
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1           # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"       # auto: bf16 where a GPU supports it, else full precision
    gradient_checkpointing: bool = False
    eval_every: int = 200
    val_batches: int = 8
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None          # torch CPU threads; 1 is far faster when other jobs share the cores
    tensorboard: bool = False
    init_from: str | None = None        # a bundle to start from (a fine-tune or a curriculum) instead of a fresh init

    POSITIVE: ClassVar = ("steps", "batch_size", "grad_accum", "lr", "eval_every", "val_batches", "save_every",
                          "keep_last", "log_every", "threads", "max_grad_norm")
    NON_NEGATIVE: ClassVar = ("weight_decay", "warmup_steps", "min_lr_ratio", "seed", "num_workers")

    def __post_init__(self) -> None:
        vars(self).update(check_values(TrainConfig, dict(vars(self)), "train"))
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r}: use one of {MIXED_PRECISION}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum ({self.grad_accum})")


@dataclass
class RunConfig:
    policy: PolicyConfig
    method: Any                          # a MethodConfig, or None for head-only training
    data: dict                           # DataConfig fields; cameras / state_keys / chunk_size come from the policy
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy.to_dict(),
            "method": None if self.method is None else self.method.to_dict(),
            "data": dict(self.data),
            "train": dataclasses.asdict(self.train),
        }


SECTIONS = ("policy", "method", "data", "train")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding vla_peft/: the repository, or site-packages


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.steps=10", "method.r=8"]`` -> ``{"train": {"steps": 10}, "method": {"r": 8}}`` (values parsed as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ValueError(f"override {pair!r} must look like section.key=value with section one of "
                             "policy, method, data, train (e.g. train.steps=500)")
        try:
            out.setdefault(section, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"override {pair!r}: the value is not valid YAML; quote it or fix it") from None
    return out


def find_relative(value: str, config_dir: Path) -> Path | None:
    """A relative path looked up in the working directory, beside the config file, then in the
    repository (the folder holding vla_peft/, where the shipped base lives); None if in none."""
    if Path(value).is_absolute():
        return Path(value) if Path(value).exists() else None
    for root in (Path.cwd(), config_dir, PACKAGE_ROOT):
        if (root / value).exists():
            return (root / value).resolve()
    return None


def resolve_base(base: str, config_dir: Path) -> str:
    """``policy.base`` as an absolute directory when it is one; a hub name (``org/name``) is kept."""
    found = find_relative(base, config_dir) if base else None
    if found is not None:
        return str(found)
    if not base or re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base):
        return base
    raise ValueError(f"policy.base={base!r}: no such directory (looked in {Path.cwd()}, {config_dir} and "
                     f"{PACKAGE_ROOT}) and not a hub name (org/name); give the checkpoint directory's path")


def load_run_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML (or dict) and apply ``section.key=value`` overrides; every value is
    checked here (typed_config), before anything loads. Relative ``policy.base``, ``method`` and
    ``data`` paths are found as ``find_relative`` says; ``train.output_dir`` stays relative to the
    working directory."""
    from vla_peft.data.dataset import DataConfig
    from vla_peft.policy.peft_link import load_method

    if isinstance(source, dict):
        raw, root = dict(source), Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no training config at {path}; the built-in ones are in configs/train/")
        raw, root = read_yaml_mapping(path, "a training config with sections " + ", ".join(SECTIONS)), path.resolve().parent
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ValueError(f"training config: unknown section(s) {sorted(unknown)}; use policy, method, data, train")
    overrides = list(overrides or [])
    swapped = [o for o in overrides if o.startswith("method=")]  # method=<yaml path | none> replaces the section
    extra = parse_overrides([o for o in overrides if o not in swapped])
    if swapped:
        raw["method"] = swapped[-1].partition("=")[2]
    sections = {}
    for name in ("policy", "data", "train"):
        given = raw.get(name) or {}
        check_keys({"policy": PolicyConfig, "data": DataConfig, "train": TrainConfig}[name], given, name)
        sections[name] = {**given, **extra.get(name, {})}
    policy, data, train = sections["policy"], sections["data"], sections["train"]
    data = check_values(DataConfig, data, "data")
    for key in ("paths", "grounding_paths"):
        if key in data:
            data[key] = [str(find_relative(p, root) or p) for p in data[key]]
    policy = check_values(PolicyConfig, policy, "policy")
    if "base" in policy:
        policy["base"] = resolve_base(policy["base"], root)
    method = raw.get("method")
    if isinstance(method, str) and method != "none":
        method = str(find_relative(method, root) or method)
    if method in (None, "none") and extra.get("method"):
        raise ValueError("method overrides given but the config has method: none")
    method_config = load_method(method, extra.get("method"))
    return RunConfig(
        policy=build_config(PolicyConfig, policy, "policy"),
        method=method_config,
        data=data,
        train=build_config(TrainConfig, train, "train"),
    )
