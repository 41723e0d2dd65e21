"""Method configs: validated dataclasses, loadable from YAML or a dict, dispatched on "method"."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


from vla_peft.peft.base import SCOPES
from vla_peft.typed_config import check_values, read_yaml_mapping

_REGISTRY: dict[str, type[MethodConfig]] = {}

# Where each built-in method's config class lives; imported on first use so that loading a
# config does not import every method.
_BUILTIN = {
    "lora": "vla_peft.peft.lora",
    "adapter": "vla_peft.peft.adapter",
    "prefix": "vla_peft.peft.prefix",
    "prompt": "vla_peft.peft.prefix",
}


@dataclass
class MethodConfig:
    """Base of every method config. Subclasses validate in ``__post_init__`` and raise
    ``ValueError`` naming the field and the fix."""

    method: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, including ``"method"``."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"config says method {method!r} but {cls.__name__} is for {cls.method!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in d if key not in valid]
        if unknown:
            hints = {key: difflib.get_close_matches(key, valid, n=3, cutoff=0.4) for key in unknown}
            raise ValueError(
                f"unknown {cls.method} config key(s) {unknown}; nearest valid keys: {hints}; "
                f"valid keys are {valid}"
            )
        return cls(**check_values(cls, d, "method"))


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make ``cls`` loadable under ``cls.method``."""
    _REGISTRY[cls.method] = cls
    return cls


def config_class(method: str) -> type[MethodConfig]:
    """The registered config class for ``method`` (importing a built-in method on first use)."""
    if method not in _REGISTRY and method in _BUILTIN:
        importlib.import_module(_BUILTIN[method])
    if method not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_BUILTIN))
        raise ValueError(f"unknown PEFT method {method!r}; known methods: {known}")
    return _REGISTRY[method]


def load_method_config(source: str | Path | dict, overrides: dict | None = None) -> MethodConfig:
    """A method config from a YAML file or a dict, with ``overrides`` applied on top."""
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no PEFT config at {path}; the built-in ones are in configs/peft/")
        data = read_yaml_mapping(path, "a PEFT method config (method: lora, r: 8, ...)")
    data.update(overrides or {})
    if "method" not in data:
        raise ValueError(f"the config has no 'method' key; set method to one of {sorted(set(_REGISTRY) | set(_BUILTIN))}")
    return config_class(data["method"]).from_dict(data)


def check_targets(targets: Any, field: str = "targets") -> dict[str, list[str]]:
    """Validate a ``scope -> [regex, ...]`` mapping; shared by every method config."""
    if not isinstance(targets, dict) or not targets:
        raise ValueError(
            f"{field} must map scopes {SCOPES} to lists of module-name patterns, e.g. "
            "{'language': ['layers\\\\.\\\\d+\\\\.self_attn\\\\.(q|v)_proj']} (got " + repr(targets) + ")"
        )
    for scope, patterns in targets.items():
        if scope not in SCOPES:
            raise ValueError(f"{field} has unknown scope {scope!r}; use one of {SCOPES}")
        if isinstance(patterns, str) or not isinstance(patterns, list) or not patterns:
            raise ValueError(f"{field}[{scope!r}] must be a non-empty list of regex patterns (got {patterns!r})")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"{field}[{scope!r}] pattern {pattern!r} is not a valid regex: {err}") from None
    return targets
