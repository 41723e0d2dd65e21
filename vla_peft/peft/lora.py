"""LoRA (Hu et al. 2021): a low-rank update B·A beside a frozen linear, over full-precision
or 4-bit NF4 (QLoRA) bases."""

from __future__ import annotations

from dataclasses import dataclass, field

from vla_peft.peft.config import MethodConfig, check_targets, register


def default_lora_targets() -> dict[str, list[str]]:
    """Attention projections of both towers and both projector linears."""
    return {
        "vision": [r"encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj"],
        "projector": [r"linear_[12]"],
        "language": [r"layers\.\d+\.self_attn\.(q|k|v|o)_proj"],
    }


@register
@dataclass
class LoraConfig(MethodConfig):
    """``targets`` maps a scope to regex patterns matched in full against module names relative
    to the scope root; non-linear modules a pattern matches are skipped, so ``[".*"]`` means
    every linear of the scope. ``load_in_4bit`` marks QLoRA: the base must be loaded in NF4."""

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: dict[str, list[str]] = field(default_factory=default_lora_targets)
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be > 0 (got {self.r!r}): set r to a positive integer such as 8")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (got {self.alpha!r}): set alpha to e.g. 2*r")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout!r})")
        self.alpha = float(self.alpha)
        self.targets = check_targets(self.targets)

    @property
    def scaling(self) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA (keeps the update's scale stable as r grows)."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)
