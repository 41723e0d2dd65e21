"""Trainable and total parameters per scope, printed as a small table."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from vla_peft.peft.base import SCOPES, scope_modules


@dataclass
class ParameterReport:
    """``rows`` maps each scope (vision, projector, language, other) to (trainable, total)."""

    rows: dict[str, tuple[int, int]]

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.rows.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.rows.values())

    def __str__(self) -> str:
        lines = [f"{'scope':<10} {'trainable':>12} {'total':>12} {'%':>8}"]
        for scope, (trainable, total) in [*self.rows.items(), ("all", (self.trainable, self.total))]:
            share = 100.0 * trainable / total if total else 0.0
            lines.append(f"{scope:<10} {trainable:>12,} {total:>12,} {share:>7.3f}%")
        return "\n".join(lines)


def numel(p: nn.Parameter) -> int:
    """Logical parameter count: a packed 4-bit weight holds two values per byte, so count
    the shape it stands for."""
    quant_state = getattr(p, "quant_state", None)
    return math.prod(quant_state.shape) if quant_state is not None else p.numel()


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count parameters per scope; everything outside the three scopes (e.g. lm_head) is "other"."""
    scope_of = {}
    for scope, root in scope_modules(model).items():
        for p in root.parameters():
            scope_of[id(p)] = scope
    rows = {scope: [0, 0] for scope in (*SCOPES, "other")}
    for p in model.parameters():
        row = rows[scope_of.get(id(p), "other")]
        row[1] += numel(p)
        if p.requires_grad:
            row[0] += numel(p)
    return ParameterReport({scope: (t, n) for scope, (t, n) in rows.items()})
