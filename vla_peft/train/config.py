"""A training run's configuration: policy, PEFT method, data and optimisation, from one YAML file.

The YAML has four sections (``policy``, ``method``, ``data``, ``train``); ``key=value``
overrides address them with dotted names (``train.steps=500``, ``method.r=8``).
``method`` is a path to a PEFT config (``configs/peft/lora.yaml``), an inline mapping,
or ``none`` for head-only training; ``method=<path>`` on the command line swaps it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vla_peft.policy.config import PolicyConfig

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

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("lr", "weight_decay", "min_lr_ratio", "max_grad_norm"):  # YAML reads 1e-3 as a string
            setattr(self, name, float(getattr(self, name)))
        positive = ["steps", "batch_size", "grad_accum", "eval_every", "save_every", "keep_last", "log_every"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train config: {name} must be > 0 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise ValueError(f"train config: lr must be > 0 (got {self.lr}), e.g. 3e-4")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train config: mixed_precision={self.mixed_precision!r}: use one of {MIXED_PRECISION}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train config: batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")


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


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.steps=10", "method.r=8"]`` -> ``{"train": {"steps": 10}, "method": {"r": 8}}`` (values parsed as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("policy", "method", "data", "train"):
            raise ValueError(f"override {pair!r} must look like section.key=value with section one of "
                             "policy, method, data, train (e.g. train.steps=500)")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def _dataclass_from(cls, values: dict, section: str):
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ValueError(f"{section} config: unknown key {key!r}; nearest: {difflib.get_close_matches(key, names, n=3)}")
    return cls(**values)


def load_run_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML (or dict) and apply ``section.key=value`` overrides."""
    from vla_peft.policy.peft_link import load_method

    if isinstance(source, dict):
        raw, root = dict(source), Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no training config at {path}; the built-in ones are in configs/train/")
        raw, root = yaml.safe_load(path.read_text()) or {}, path.parent
    unknown = set(raw) - {"policy", "method", "data", "train"}
    if unknown:
        raise ValueError(f"training config: unknown section(s) {sorted(unknown)}; use policy, method, data, train")
    overrides = list(overrides or [])
    swapped = [o for o in overrides if o.startswith("method=")]  # method=<yaml path | none> replaces the section
    extra = parse_overrides([o for o in overrides if o not in swapped])
    if swapped:
        raw["method"] = swapped[-1].partition("=")[2]
    policy = {**(raw.get("policy") or {}), **extra.get("policy", {})}
    data = {**(raw.get("data") or {}), **extra.get("data", {})}
    train = {**(raw.get("train") or {}), **extra.get("train", {})}
    method = raw.get("method")
    if isinstance(method, str) and method != "none" and not Path(method).exists() and (root / method).exists():
        method = str(root / method)  # a path relative to the YAML file rather than to the working directory
    if method in (None, "none") and extra.get("method"):
        raise ValueError("method overrides given but the config has method: none")
    method_config = load_method(method, extra.get("method"))
    return RunConfig(
        policy=PolicyConfig.from_dict(policy),
        method=method_config,
        data=data,
        train=_dataclass_from(TrainConfig, train, "train"),
    )
