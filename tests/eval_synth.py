"""Small freshly initialised policies and bundles for the evaluation and hot-swap tests.

LoRA B matrices start at zero, which would make every bundle act like the base; here they
are filled with random values so that different bundles give different actions."""

from __future__ import annotations

import numpy as np
import torch

from vla_peft.data.stats import Normalizer, Stats
from vla_peft.models import load_vlm
from vla_peft.peft import LoraConfig
from vla_peft.policy import PolicyConfig, VLAPolicy

LORA_TARGETS = {
    "vision": [r"encoder\.layers\.\d+\.self_attn\.(q|v)_proj"],
    "language": [r"layers\.\d+\.self_attn\.(q|v)_proj"],
}


def normalizers(action_dim: int = 4, state_dim: int = 5) -> dict[str, Normalizer]:
    def stats(dim: int, scale: float) -> Stats:
        lo, hi = -scale * np.ones(dim), scale * np.ones(dim)
        return Stats(mean=np.zeros(dim), std=np.ones(dim), min=lo, max=hi, q01=lo.copy(), q99=hi.copy(), count=100)

    return {"actions": Normalizer(stats(action_dim, 1.0), "min_max"), "state": Normalizer(stats(state_dim, 0.3), "min_max")}


def make_policy(base_dir, seed: int, lora: bool = True, vlm=None, processor=None, targets=None,
                **policy_kwargs) -> VLAPolicy:
    """A policy on the tiny base with random (non-zero) LoRA (on ``targets``, default ``LORA_TARGETS``),
    head and queries drawn from ``seed``."""
    if vlm is None:
        vlm, processor = load_vlm(base_dir)
    config = PolicyConfig(base=str(base_dir), image_size=32, state_dim=5, chunk_size=4, execute_steps=2,
                          head_width=64, **policy_kwargs)
    torch.manual_seed(seed)
    method = LoraConfig(r=4, alpha=8, targets=targets or LORA_TARGETS) if lora else None
    policy = VLAPolicy(config, vlm, processor, method)
    with torch.no_grad():
        for name, param in vlm.named_parameters():
            if "lora_B" in name and param.requires_grad:
                param.normal_(0.0, 0.2)
    policy.normalizers = normalizers(config.action_dim, config.state_dim)
    return policy.eval()


def one_torch_thread():
    """Run a test module's tiny models on one thread: at this size two threads mostly wait on each
    other, and on a shared machine they wait much longer. Restores the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
