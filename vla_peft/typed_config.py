"""The one validation layer for configs read from YAML or ``key=value`` overrides.

Every config section is a dataclass; its field types say what a value must be, and the
class attributes ``POSITIVE`` / ``NON_NEGATIVE`` (tuples of field names) say which numbers
must be > 0 or >= 0. ``build_config`` checks a mapping against them before the dataclass is
built, so a typo or a wrong type fails at once, with one line naming ``section.key`` and the
fix, instead of deep inside training after the model has loaded. Cross-field rules stay in
each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping; bad syntax or another kind of document is one clear error."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "bad syntax"
        raise ValueError(f"{path}: not valid YAML ({problem}{where}); fix the file's syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected {what}, but the file holds a {type(raw).__name__} ({str(raw)[:40]!r})")
    return raw


def check_keys(cls, values: Any, section: str) -> None:
    """``values`` must be a mapping of ``cls``'s field names; an unknown key gets the nearest valid one."""
    if not isinstance(values, dict):
        raise ValueError(f"{section}: expected a mapping of keys to values, got {type(values).__name__} {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"did you mean {section}.{near[0]}?" if near else f"valid keys: {', '.join(names)}"
            raise ValueError(f"{section}: unknown key {key!r}; {hint}")


def check_values(cls, values: dict, section: str) -> dict:
    """Check keys, types and ranges; return the values with YAML's quirks undone (``1e-3`` is read
    as a string by PyYAML; a single string where a list is wanted becomes a one-item list)."""
    check_keys(cls, values, section)
    hints = _type_hints(cls)
    out = {}
    for key, value in values.items():
        out[key] = _coerce(hints[key], value, f"{section}.{key}")
    for key in getattr(cls, "POSITIVE", ()):
        if key in out and out[key] is not None and not out[key] > 0:
            raise ValueError(f"{section}.{key}={out[key]!r}: must be > 0")
    for key in getattr(cls, "NON_NEGATIVE", ()):
        if key in out and out[key] is not None and not out[key] >= 0:
            raise ValueError(f"{section}.{key}={out[key]!r}: must be >= 0")
    return out


@functools.cache
def _type_hints(cls) -> dict:
    """A class's resolved field types, once per class: ``typing.get_type_hints`` evaluates every
    annotation string again on each call, and a config is checked at every bundle load."""
    return typing.get_type_hints(cls)


def build_config(cls, values: dict, section: str):
    """``cls(**values)`` after ``check_values``; a ``__post_init__`` rule that fails names the section."""
    checked = check_values(cls, values, section)
    try:
        return cls(**checked)
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith(section) else f"{section}: {message}") from None


def _coerce(kind, value: Any, name: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, name)
            except ValueError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ValueError(
            f"{name}={value!r}: expected {' or '.join(_describe(a) for a in args)}")
    if origin in (list, tuple):
        if isinstance(value, (str, os.PathLike)) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}={value!r}: expected {_describe(kind)}, e.g. {name}=[a, b]")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{name}={value!r}: expected {len(args)} values ({_describe(kind)})")
            return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}={value!r}: expected a mapping")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r}: expected a whole number, e.g. {name}=10")
        return value
    if kind is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a number, e.g. {name}=3e-4") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r}: expected a finite number, e.g. {name}=3e-4")
        return float(value)
    if kind is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r}: expected a string")
        return value
    return value


def _describe(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ')}s" if args else "a list"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", type(None): "null"}
    return "a mapping" if origin is dict else names.get(kind, str(kind))
