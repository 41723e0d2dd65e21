"""Put a PEFT method into a model: freeze the base, add the method's modules, report."""

from __future__ import annotations

import importlib

from torch import nn

from vla_peft.peft.base import PeftModule, freeze, set_plain
from vla_peft.peft.config import MethodConfig
from vla_peft.peft.lora import LoraAdapter, LoraConfig, inject_lora, refuse_if_merged
from vla_peft.peft.report import ParameterReport, parameter_report


def inject(model: nn.Module, config: MethodConfig, adapter_name: str = "default",
           report: bool = True, weights: dict | None = None, frozen: bool = False) -> ParameterReport | None:
    """Freeze all of ``model``, add ``config``'s modules under ``adapter_name`` and make only
    them trainable. Injecting a second LoRA config under a new name adds a second adapter to
    the same layers and makes it the active (and only trainable) one.

    The config is recorded as ``model.peft_config_vla[adapter_name]`` so that it can be saved.
    Returns the parameter report, or None with ``report=False``: counting walks every parameter,
    resident adapters included, so loading many bundles (AdapterBank) skips it. ``weights`` (LoRA
    only: module path -> saved (A, B)) builds the adapters from a file's tensors (see ``inject_lora``).
    ``frozen=True`` adds the modules frozen and walks nothing to freeze, for a caller that only runs
    adapters and keeps the base and every resident adapter frozen (AdapterBank: a load then costs the
    same however large the base and however many adapters it holds).
    """
    configs = getattr(model, "peft_config_vla", None) or {}
    if adapter_name in configs:
        raise ValueError(
            f"the model already has an adapter named {adapter_name!r} ({configs[adapter_name].method}); "
            "pass another adapter_name"
        )
    modules = _inject_method(model, config, adapter_name, weights, trainable=not frozen)
    if not frozen:
        freeze(model)
    for module in modules:
        set_plain(module, adapter_name=adapter_name)
        if not frozen:
            module.requires_grad_(True)
        elif not isinstance(module, LoraAdapter):  # LoRA's are built frozen
            module.requires_grad_(False)
    model.peft_trainable = modules  # what the next freeze (or inject) must freeze again
    model.peft_config_vla = {**configs, adapter_name: config}
    return parameter_report(model) if report else None


# The other methods live in their own modules, imported on first use:
# method -> (module, function(model, config) -> list[PeftModule]).
INJECTORS = {
    "adapter": ("vla_peft.peft.adapter", "inject_adapters"),
    "prefix": ("vla_peft.peft.prefix", "inject_prefix"),
    "prompt": ("vla_peft.peft.prefix", "inject_prompt"),
}


def _inject_method(model: nn.Module, config: MethodConfig, adapter_name: str, weights: dict | None,
                   trainable: bool) -> list[PeftModule]:
    if isinstance(config, LoraConfig):
        return inject_lora(model, config, adapter_name, weights, trainable)
    if weights is not None:
        raise ValueError(f"inject builds {config.method!r} modules from their init only; pass weights=None")
    if config.method not in INJECTORS:
        raise ValueError(f"inject does not know method {config.method!r}; known: {['lora', *INJECTORS]}")
    module, function = INJECTORS[config.method]
    return getattr(importlib.import_module(module), function)(model, config)


def peft_modules(model: nn.Module, adapter_name: str | None = None) -> dict[str, PeftModule]:
    """The PEFT modules of ``model`` by path (only ``adapter_name``'s if given)."""
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, PeftModule) and (adapter_name is None or getattr(m, "adapter_name", None) == adapter_name)
    }


def set_peft_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every PEFT module on or off; off gives the base model's outputs."""
    refuse_if_merged(model, "switch PEFT modules on or off")
    for module in peft_modules(model).values():
        module.enabled = enabled


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Choose which named LoRA adapter runs (None: none). One attribute assignment, so it is
    cheap enough to do per task on a running robot."""
    refuse_if_merged(model, "switch the active adapter")
    active = getattr(model, "lora_active_adapter", None)
    configs = getattr(model, "peft_config_vla", {})
    lora_names = sorted(n for n, c in configs.items() if isinstance(c, LoraConfig))
    if active is None or (name is not None and name not in lora_names):
        raise ValueError(f"no LoRA adapter named {name!r} in this model; its LoRA adapters: {lora_names}")
    active.name = name
