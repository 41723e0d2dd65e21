"""Bottleneck adapters (Houlsby et al. 2019): a small down-project / nonlinearity / up-project
block with its own residual, inserted after the attention output and after the MLP output of
transformer layers.

Each adapter becomes a child named ``adapter`` of the module it follows (``...mlp.adapter``,
``...self_attn.o_proj.adapter``) and runs from a forward hook on that module, so the base's own
module paths and weights stay exactly as they were: a base checkpoint still loads into the
injected model, and the adapter's parameters are saved under a path that names where it sits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vla_peft.peft.base import PeftModule, find_targets
from vla_peft.peft.config import MethodConfig, check_targets, register

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def default_adapter_targets() -> dict[str, list[str]]:
    """Houlsby's two places in every layer of both towers: after attention out and after the MLP."""
    return {
        "vision": [r"encoder\.layers\.\d+\.(self_attn\.out_proj|mlp)"],
        "language": [r"layers\.\d+\.(self_attn\.o_proj|mlp)"],
    }


@register
@dataclass
class AdapterConfig(MethodConfig):
    """``bottleneck`` is the adapter width m; ``targets`` maps a scope to regex patterns matched in
    full against module names relative to the scope root: an adapter goes after the output of each
    matched module (e.g. ``layers\\.(0|1)\\.mlp`` for the MLPs of the first two layers only)."""

    method = "adapter"
    bottleneck: int = 16
    activation: str = "gelu"
    targets: dict[str, list[str]] = field(default_factory=default_adapter_targets)

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(
                f"bottleneck must be a positive integer (got {self.bottleneck!r}): set bottleneck to e.g. 16"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} (got {self.activation!r})")
        self.targets = check_targets(self.targets)


class BottleneckAdapter(PeftModule):
    """``h + up(act(down(h)))`` with ``up`` zero at init, so the model starts exactly as the base.

    Parameters: 2·d·m + d + m. They are kept in float32 whatever the base's dtype (half-precision
    or 4-bit), and the adapter casts its input in and its output back.
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return hidden
        delta = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + delta.to(hidden.dtype)

    def after_hook(self, module: nn.Module, args: tuple, output):
        """Forward hook on the module the adapter follows; handles modules that return tuples."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


def output_dim(module: nn.Module) -> int | None:
    """Width of a module's output: its own ``out_features`` (linears, 4-bit linears) or that of
    its last linear child (an MLP ends with its down/fc2 projection)."""
    if isinstance(getattr(module, "out_features", None), int):
        return module.out_features
    last = None
    for child in module.modules():
        if child is not module and isinstance(getattr(child, "out_features", None), int):
            last = child.out_features
    return last


def inject_adapters(model: nn.Module, config: AdapterConfig) -> list[PeftModule]:
    """Insert a trainable adapter after each module ``config.targets`` selects; return them."""
    targets = find_targets(
        model, config.targets, accept=lambda m: not isinstance(m, PeftModule) and output_dim(m) is not None,
        kind="module with a linear output",
    )
    adapters: list[PeftModule] = []
    for target in targets:
        if isinstance(getattr(target.module, "adapter", None), BottleneckAdapter):
            raise ValueError(
                f"{target.path} already has a bottleneck adapter: inject adapters once per model "
                "(load the base again to start over)"
            )
        device = next(target.module.parameters()).device
        adapter = BottleneckAdapter(output_dim(target.module), config.bottleneck, config.activation).to(device)
        target.module.add_module("adapter", adapter)
        target.module.register_forward_hook(adapter.after_hook)
        adapter.requires_grad_(True)
        adapters.append(adapter)
    return adapters
