"""The one place the policy touches the PEFT core: inject a method, save and load its weights."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load_method(source, overrides: dict | None = None) -> object | None:
    """A method config from a YAML path or dict; None / "none" means no PEFT (head-only training)."""
    if source is None or source == "none":
        return None
    from vla_peft.peft.config import load_method_config

    return load_method_config(source, overrides)


def inject_method(model: nn.Module, method_config) -> object:
    """Inject the PEFT modules into the (frozen) VLM; returns the parameter report."""
    from vla_peft.peft.inject import inject

    return inject(model, method_config)


def freeze_vlm(model: nn.Module) -> None:
    """Freeze the VLM and its PEFT modules without walking every resident adapter (see peft.base.freeze)."""
    from vla_peft.peft.base import freeze

    freeze(model)


def save_method(model: nn.Module, directory: Path) -> None:
    """Write the injected PEFT weights (LoRA in HF peft's format) to ``directory``."""
    from vla_peft.peft.io import save_adapter

    save_adapter(model, directory)


def load_method_weights(model: nn.Module, directory: Path, adapter_name: str = "default") -> None:
    """Inject the PEFT method saved by ``save_method`` and read its weights (no parameter report:
    counting would walk every resident adapter)."""
    from vla_peft.peft.io import load_adapter

    load_adapter(model, directory, adapter_name=adapter_name, report=False)
