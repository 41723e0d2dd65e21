"""Task bundles on the tiny base for the hot-swap and latency benches: one LoRA policy whose
LoRA B matrices (zero at init) and head are redrawn from a new seed per bundle, saved each time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vla_peft.data.stats import Normalizer, Stats
from vla_peft.models import load_vlm
from vla_peft.peft import LoraConfig
from vla_peft.policy import PolicyConfig, VLAPolicy
from vla_peft.policy.bundle import save_bundle

LORA = LoraConfig(r=8, alpha=16)  # the default targets: attention of both towers + the projector


def _normalizers(action_dim: int, state_dim: int) -> dict[str, Normalizer]:
    def stats(dim: int) -> Stats:
        lo, hi = -np.ones(dim), np.ones(dim)
        return Stats(mean=np.zeros(dim), std=np.ones(dim), min=lo, max=hi, q01=lo.copy(), q99=hi.copy(), count=1)

    return {"actions": Normalizer(stats(action_dim), "min_max"), "state": Normalizer(stats(state_dim), "min_max")}


def make_bundles(base: str | Path, out: Path, count: int, lora: bool = True) -> list[Path]:
    """``count`` bundles ``out/task_000`` ... for the base at ``base``."""
    vlm, processor = load_vlm(base)
    config = PolicyConfig(base=str(base), image_size=64, state_dim=5, chunk_size=8, execute_steps=4)
    policy = VLAPolicy(config, vlm, processor, LORA if lora else None)
    policy.normalizers = _normalizers(config.action_dim, config.state_dim)
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name or name.startswith("head."):
                    param.normal_(0.0, 0.05)
        paths.append(save_bundle(policy, out / f"task_{i:03d}"))
    return paths


def observation(batch: int = 1, size: int = 64, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "agentview_rgb": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "ee_pos": rng.uniform(-0.2, 0.2, (batch, 3)).astype(np.float32),
        "gripper_states": rng.uniform(0, 0.05, (batch, 2)).astype(np.float32),
        "instruction": ["pick up the red cube"] * batch,
    }
