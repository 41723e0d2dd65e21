"""Save and load one adapter as a directory: safetensors weights, JSON config, base fingerprint.

LoRA adapters are also written in HF peft's layout (``adapter_config.json`` +
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight``),
so ``PeftModel.from_pretrained`` loads ours and ``load_adapter`` loads peft's. Our own
config and the base fingerprint live in ``vla_peft.json`` beside them, which peft ignores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load, save_file
from torch import nn

from vla_peft.peft.base import find_targets, scope_modules, scope_paths
from vla_peft.peft.config import load_method_config
from vla_peft.peft.inject import inject, peft_modules
from vla_peft.peft.lora import LoraConfig, is_4bit, is_linear, lora_layers, refuse_if_merged
from vla_peft.peft.report import ParameterReport

WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
OURS = "vla_peft.json"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."

# adapter_config.json settings we do not implement; a peft adapter using one is refused.
_PEFT_DEFAULTS = {"peft_type": "LORA", "bias": "none", "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "use_qalora": False}
_PEFT_UNSET = ("rank_pattern", "alpha_pattern", "modules_to_save", "trainable_token_indices", "target_parameters", "layer_replication", "alora_invocation_tokens")


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``model`` to directory ``path`` (replaced atomically)."""
    configs = getattr(model, "peft_config_vla", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}; it has {sorted(configs)}")
    config = configs[adapter_name]
    if isinstance(config, LoraConfig):
        refuse_if_merged(model, "save a LoRA adapter")
    tensors, targets = _adapter_tensors(model, adapter_name, config)
    ours = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "fingerprint": base_fingerprint(model, targets)}
    path = Path(path)
    with _atomic_dir(path) as tmp:
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / OURS).write_text(json.dumps(ours, indent=2))
        if isinstance(config, LoraConfig):
            (tmp / PEFT_CONFIG).write_text(json.dumps(_peft_config(model, config, sorted(targets)), indent=2))
    return path


def _adapter_tensors(model: nn.Module, adapter_name: str, config) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's parameters under the keys its file holds, and its targets' shapes (the fingerprint's)."""
    if isinstance(config, LoraConfig):
        layers = {p: layer for p, layer in lora_layers(model).items() if adapter_name in layer.adapters}
        tensors = {}
        for p, layer in layers.items():
            adapter = layer.adapters[adapter_name]
            tensors[f"{PEFT_PREFIX}{p}.lora_A.weight"] = adapter.lora_A.weight
            tensors[f"{PEFT_PREFIX}{p}.lora_B.weight"] = adapter.lora_B.weight
        return tensors, {p: _linear_shape(layer.base_layer) for p, layer in layers.items()}
    tensors = {
        f"{p}.{name}": param
        for p, module in peft_modules(model, adapter_name).items()
        for name, param in module.named_parameters()
    }
    return tensors, {key: list(t.shape) for key, t in tensors.items()}


# What a fine-tune may change against the adapter it starts from: these do not change what the weights compute.
TRAINING_ONLY = ("dropout", "load_in_4bit")


def fill_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Copy the weights saved at ``path`` (ours, from ``save_adapter``) into adapter ``adapter_name``,
    already injected and trainable: a fine-tune that starts from a trained adapter. The two must be the
    same method on the same targets with the same shapes (dropout may differ), or one clear error says
    what differs; nothing is copied then."""
    path = Path(path)
    if not (path / OURS).is_file():
        raise FileNotFoundError(f"{path} has no {OURS}: start a fine-tune from an adapter vla_peft saved")
    config = getattr(model, "peft_config_vla", {})[adapter_name]
    saved = json.loads((path / OURS).read_text())["config"]
    here = config.to_dict()
    differs = sorted(k for k in {*saved, *here} - set(TRAINING_ONLY) if saved.get(k) != here.get(k))
    if differs:
        theirs, ours = (", ".join(f"{k}={side.get(k)!r}" for k in differs) for side in (saved, here))
        raise ValueError(f"{path}: the saved adapter's {theirs} differ from this model's ({ours}); "
                         "use the same method config")
    tensors = _read_weights(path / WEIGHTS)
    params, _ = _adapter_tensors(model, adapter_name, config)
    _check_keys(set(params), tensors, path)
    wrong = [k for k, param in params.items() if tensors[k].shape != param.shape]
    if wrong:
        raise ValueError(f"{path}: {wrong[0]} is {list(tensors[wrong[0]].shape)}, the model's {list(params[wrong[0]].shape)}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default",
                 report: bool = True, frozen: bool = False) -> ParameterReport | None:
    """Inject the adapter saved at ``path`` into ``model`` under ``adapter_name`` and fill in its
    weights. Works for our directories and for LoRA directories saved by HF peft. Refuses,
    before touching the model where it can, an adapter made for a different base. Returns the
    parameter report (None with ``report=False``, which keeps a load's cost flat; see ``inject``,
    also for ``frozen``)."""
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not an adapter directory: {WEIGHTS} is missing")
    tensors = _read_weights(path / WEIGHTS)
    if (path / OURS).is_file():
        ours = json.loads((path / OURS).read_text())
        config = load_method_config(ours["config"])
        fingerprint = ours["fingerprint"]
        _check_same_base(model, fingerprint, path)
    elif (path / PEFT_CONFIG).is_file():
        config = _config_from_peft(model, json.loads((path / PEFT_CONFIG).read_text()), tensors, path)
        fingerprint = None
    else:
        raise FileNotFoundError(f"{path} has neither {OURS} nor {PEFT_CONFIG}; it was not written by save_adapter or peft")

    if isinstance(config, LoraConfig):
        return _load_lora(model, config, tensors, fingerprint, adapter_name, path, report, frozen)
    counts = inject(model, config, adapter_name, report=report, frozen=frozen)
    params = {f"{p}.{n}": param for p, m in peft_modules(model, adapter_name).items() for n, param in m.named_parameters()}
    _check_keys(set(params), tensors, path)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
    return counts


def base_fingerprint(model: nn.Module, targets: dict[str, list[int]]) -> dict:
    """What an adapter needs of its base: the architecture, the towers' sizes and the shapes
    of the modules it targets."""
    cfg = model.config
    vision, text = cfg.vision_config, cfg.text_config
    return {
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "vision": {k: getattr(vision, k, None) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")},
        "text": {k: getattr(text, k, None) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "targets": targets,
    }


def _load_lora(model, config, tensors, fingerprint, adapter_name, path, report, frozen) -> ParameterReport | None:
    found = {t.path: t.module for t in find_targets(model, config.targets, accept=is_linear, kind="linear")}
    bases = {p: getattr(m, "base_layer", m) for p, m in found.items()}
    shapes = {p: _linear_shape(b) for p, b in bases.items()}
    expected = fingerprint["targets"] if fingerprint else _lora_shapes_from_tensors(tensors)
    _check_shapes(expected, shapes, path)
    # An adapter trained over NF4 loads onto a full-precision base and the other way round.
    config = dataclasses.replace(config, load_in_4bit=all(is_4bit(b) for b in bases.values()))
    _check_keys({f"{PEFT_PREFIX}{p}.lora_{x}.weight" for p in shapes for x in "AB"}, tensors, path)
    weights = {p: (tensors[f"{PEFT_PREFIX}{p}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{p}.lora_B.weight"]) for p in shapes}
    for p, (lora_A, lora_B) in weights.items():
        (d_out, d_in), r = shapes[p], config.r
        for x, value, wanted in (("A", lora_A, [r, d_in]), ("B", lora_B, [d_out, r])):
            if list(value.shape) != wanted:
                raise ValueError(
                    f"{path}: lora_{x} of {p} has shape {list(value.shape)} but r={r} needs {wanted}; "
                    "the file and its config disagree"
                )
    # The adapters are made of the file's tensors: no init drawn only to be overwritten.
    return inject(model, config, adapter_name, report=report, weights=weights, frozen=frozen)


def _linear_shape(linear: nn.Module) -> list[int]:
    return [linear.out_features, linear.in_features]


def _lora_shapes_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for key, t in tensors.items():
        match = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise ValueError(f"unexpected tensor {key!r} in a LoRA adapter: only lora_A / lora_B weights are supported")
        p, x = match.groups()
        shape = shapes.setdefault(p, [0, 0])
        if x == "A":
            shape[1] = t.shape[1]
        else:
            shape[0] = t.shape[0]
    return shapes


def _peft_config(model: nn.Module, config: LoraConfig, target_paths: list[str]) -> dict:
    """adapter_config.json as peft 0.21 writes it, for the settings we implement."""
    alpha = int(config.alpha) if config.alpha.is_integer() else config.alpha
    return {
        **_PEFT_DEFAULTS,
        "task_type": None,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": target_paths,
        "init_lora_weights": True,
        "inference_mode": True,
        **{key: None for key in ("modules_to_save", "layer_replication")},
        **{key: {} for key in ("rank_pattern", "alpha_pattern")},
    }


def _config_from_peft(model: nn.Module, peft: dict, tensors: dict[str, torch.Tensor], path: Path) -> LoraConfig:
    """Our LoraConfig for a peft-saved LoRA adapter: its targets are exactly the saved modules."""
    for key, default in _PEFT_DEFAULTS.items():
        if peft.get(key, default) != default:
            raise ValueError(f"{path}/{PEFT_CONFIG} sets {key}={peft[key]!r}; only {key}={default!r} is supported")
    for key in _PEFT_UNSET:
        if peft.get(key):
            raise ValueError(f"{path}/{PEFT_CONFIG} sets {key}; vla_peft does not support it for LoRA")
    scope_modules(model)  # a clear error for a model that is not LLaVA-style
    scope_prefix = {scope: root + "." for scope, root in scope_paths(model).items()}
    targets: dict[str, list[str]] = {}
    for module_path in sorted(_lora_shapes_from_tensors(tensors)):
        scope = next((s for s, pre in scope_prefix.items() if module_path.startswith(pre)), None)
        if scope is None:
            raise ValueError(
                f"{path} targets {module_path}, outside the vision/projector/language scopes vla_peft adapts"
            )
        targets.setdefault(scope, []).append(re.escape(module_path[len(scope_prefix[scope]):]))
    return LoraConfig(
        r=int(peft["r"]),
        alpha=float(peft["lora_alpha"]),
        dropout=float(peft.get("lora_dropout", 0.0)),
        use_rslora=bool(peft.get("use_rslora", False)),
        targets=targets,
    )


def _check_same_base(model: nn.Module, fingerprint: dict, path: Path) -> None:
    here = base_fingerprint(model, {})
    diffs = [
        f"{key}: adapter {fingerprint.get(key)!r} vs model {here[key]!r}"
        for key in ("architecture", "model_type", "vision", "text")
        if fingerprint.get(key) != here[key]
    ]
    if diffs:
        raise ValueError(
            f"the adapter at {path} was made for a different base model ({'; '.join(diffs)}); "
            "load it onto the base it was trained on"
        )


def _check_shapes(expected: dict[str, list[int]], here: dict[str, list[int]], path: Path) -> None:
    missing = sorted(set(expected) - set(here))
    extra = sorted(set(here) - set(expected))
    wrong = sorted(p for p in set(expected) & set(here) if list(expected[p]) != here[p])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"modules missing here: {missing[:3]}")
        if extra:
            parts.append(f"modules its patterns select here but it has no weights for: {extra[:3]}")
        if wrong:
            parts.append("shape differences: " + ", ".join(f"{p} {expected[p]} vs {here[p]}" for p in wrong[:3]))
        raise ValueError(
            f"the adapter at {path} was made for a different base model ({'; '.join(parts)}); "
            "load it onto the base it was trained on"
        )


def _check_keys(wanted: set[str], tensors: dict[str, torch.Tensor], path: Path) -> None:
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        raise ValueError(f"{path}/{WEIGHTS} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        # Read whole, then parsed from memory: 3x faster than load_file's memory map for a file this
        # small, and a bank's load reads one per bundle.
        return load(file.read_bytes())
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ValueError(
            f"{file} is not a readable safetensors file ({err}); it is probably truncated or corrupt: "
            "save the adapter again or copy it again"
        ) from None


@contextlib.contextmanager
def _atomic_dir(path: Path):
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename, so a
    crash never leaves a half-written adapter that loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
