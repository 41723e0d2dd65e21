"""What every PEFT method shares: the module marker, the three scopes, and target matching."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

SCOPES = ("vision", "projector", "language")


def set_plain(module: nn.Module, **values) -> None:
    """Set attributes that are neither tensors nor modules (flags, names, numbers) straight in the
    instance dict, as ``nn.Module.__setattr__`` ends up doing after its type checks: those checks cost
    about 4 us each on a slow CPU, and adding a bundle to a bank sets about 150 such attributes."""
    module.__dict__.update(values)


class PeftModule(nn.Module):
    """Marker base: every module that injection creates subclasses it.

    Its parameters are the PEFT parameters (trainable after inject, saved by io, counted by
    the report). ``enabled`` switches it off without removing it: a disabled module must
    leave the base's output unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        set_plain(self, enabled=True)


class PeftWrapper(nn.Module):
    """Marker: a module that wraps a base module (LoRA's wrapper around a linear). Target
    matching sees the wrapper in the base module's place and never looks inside it."""


SCOPE_ATTRIBUTES = {"vision": "vision_tower", "projector": "multi_modal_projector", "language": "language_model"}


def scope_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The root module of each scope of a LLaVA-style model (``LlavaForConditionalGeneration``
    or the inner ``LlavaModel``)."""
    inner = getattr(model, "model", model)
    missing = [attr for attr in SCOPE_ATTRIBUTES.values() if not isinstance(getattr(inner, attr, None), nn.Module)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a LLaVA-style model: it has no {', '.join(missing)}; "
            "pass a transformers LlavaForConditionalGeneration (see vla_peft.load_vlm)"
        )
    return {scope: getattr(inner, attr) for scope, attr in SCOPE_ATTRIBUTES.items()}


def scope_paths(model: nn.Module) -> dict[str, str]:
    """Each scope root's path from the model root, as in ``named_modules`` (no walk of the model)."""
    prefix = "model." if getattr(model, "model", model) is not model else ""
    return {scope: prefix + attr for scope, attr in SCOPE_ATTRIBUTES.items()}


@dataclass
class Target:
    """One module chosen by a config's ``targets``."""

    scope: str
    name: str  # relative to the scope root, the name the pattern matched
    path: str  # full path from the model root, as in ``model.named_modules()``
    module: nn.Module


def find_targets(
    model: nn.Module,
    targets: dict[str, list[str]],
    accept: Callable[[nn.Module], bool] = lambda module: True,
    kind: str = "module",
) -> list[Target]:
    """Modules whose name (relative to their scope root) fully matches one of the scope's
    regex patterns and that ``accept`` takes.

    A pattern that selects nothing raises ``ValueError`` listing the nearest ``kind`` names,
    because a silent no-match would train nothing and look like a bad run.
    """
    roots, root_paths = scope_modules(model), scope_paths(model)
    found: list[Target] = []
    seen: set[int] = set()
    for scope, patterns in targets.items():
        root, prefix = roots[scope], root_paths[scope]
        candidates = [(name, module) for name, module in base_modules(root) if accept(module)]
        for pattern in patterns:
            regex = re.compile(pattern)
            hits = [(name, module) for name, module in candidates if regex.fullmatch(name)]
            if not hits:
                names = [name for name, _ in candidates]
                near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.0) if names else []
                raise ValueError(
                    f"target pattern {pattern!r} in scope {scope!r} matches no {kind}; patterns are "
                    f"matched in full (re.fullmatch) against names relative to the scope root. "
                    f"Nearest {kind} names there: {near or 'none'}"
                )
            for name, module in hits:
                if id(module) not in seen:
                    seen.add(id(module))
                    found.append(Target(scope, name, f"{prefix}.{name}", module))
    return found


def base_modules(module: nn.Module, prefix: str = ""):
    """``named_modules`` without the PEFT modules and without the insides of wrappers (the root
    itself not included). Its cost does not grow with the adapters a model holds, which is why
    the load path walks this rather than ``named_modules``."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, PeftModule):
            continue
        yield path, child
        if not isinstance(child, PeftWrapper):
            yield from base_modules(child, path)


def freeze(model: nn.Module, base: bool = True) -> None:
    """Freeze the base (every parameter outside the PEFT modules, wrapped linears included; skipped
    with ``base=False``, for a base known to be frozen) and the PEFT modules the last ``inject`` made
    trainable. Unlike ``model.requires_grad_(False)`` it does not walk every resident adapter, so
    adding the 50th bundle costs what adding the first did."""
    stack = [model] if base else []
    while stack:
        module = stack.pop()
        for param in module._parameters.values():
            if param is not None:
                param.requires_grad_(False)
        stack.extend(child for child in module._modules.values() if child is not None and not isinstance(child, PeftModule))
    for module in getattr(model, "peft_trainable", ()):
        module.requires_grad_(False)
