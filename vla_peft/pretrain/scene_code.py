"""What the image tokens should say: a fixed code of each patch's objects, the vision tower's target.

Measured on the CPU: a tiny LLaVA trained from scratch through the answers alone stayed at
chance on every question for 1,200 steps, yet its language model learned to bind colour
words to places within a few hundred steps when fed ideal image tokens. So pretraining gives
the vision tower an explicit target (as real LLaVA starts from a separately pretrained CLIP):
each patch token should equal the sum, over the objects in that patch, of
``kind[cube/pad colour or gripper state] + column[u bin] + row[v bin]`` (fixed random vectors,
bins as in the `where` question); an empty patch is zero. The language model reads this code
for the first steps while the vision tower learns to produce it, then reads the vision tower.
"""

from __future__ import annotations

import torch

from envs.scene import COLOURS
from vla_peft.pretrain.questions import BINS, coordinate_bin

_COLOURS = sorted(COLOURS)
KINDS = 2 * len(_COLOURS) + 2  # cube or pad of each colour, gripper open, gripper closed


def codebook(seed: int, dim: int) -> dict[str, torch.Tensor]:
    """Fixed random vectors (entries ~ N(0, 1/3), so one object's code has unit-variance entries)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, dim, generator=g) / 3**0.5 for name, n in (("kind", KINDS), ("column", BINS), ("row", BINS))}


def scene_code(annotations: list[dict], grid: int, code: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, grid*grid, dim): the target image tokens of each annotated scene."""
    out = torch.zeros(len(annotations), grid * grid, code["kind"].shape[1])
    for b, scene in enumerate(annotations):
        items = [
            (o["u"], o["v"], (o["kind"] == "pad") * len(_COLOURS) + _COLOURS.index(o["colour"]))
            for o in scene["objects"]
            if o["visible"]
        ]
        gripper = scene["gripper"]
        if gripper["visible"]:
            items.append((gripper["u"], gripper["v"], KINDS - 2 + (not gripper["open"])))
        for u, v, kind in items:
            patch = min(int(v * grid), grid - 1) * grid + min(int(u * grid), grid - 1)
            out[b, patch] += code["kind"][kind] + code["column"][coordinate_bin(u)] + code["row"][coordinate_bin(v)]
    return out
