"""The vision tower's direct target: say by name, precisely, where each thing in the image is.

Measured here: the previous base, trained through the answers and a coarse scene code, left
its frozen image tokens nearly blind to position (an MLP probe read the named cube at 8.9 cm
RMS, a random base 7.9 cm); the same vision tower trained directly on "where is the <name>"
reached 0.62 cm on held-out reset scenes. So the locator recipe adds this head: each visible object's
name (kind and colour, or the gripper) attends over the projected image tokens — what the
language model and the policy read — and regresses the object's image position. The head is
dropped after pretraining; what stays is tokens that locate things by name.

Optionally (``table=True``) it also regresses each thing's table (x, y, z). Measured: the image
position alone left a held cube's table position unread (a probe put it where its pixels would be
on the table, 3.5-5.9 cm off); the table target asks the tokens to say how high a thing is. With
it (the refine recipe) the probe's lifted cubes came to 3.8 cm, and this head read them at 4.5.
"""

from __future__ import annotations

import torch
from torch import nn

from envs.scene import COLOURS

_COLOURS = sorted(COLOURS)
GRIPPER = 2 * len(_COLOURS)  # names: cube of each colour, pad of each colour, the gripper
NAMES = GRIPPER + 1
SCALE = 10.0  # image fractions -> tenths of the image, so the loss is O(1)
TABLE_SCALE = 25.0  # metres -> units of 4 cm, about a tenth of the image on the table


def name_index(kind: str, colour: str | None) -> int:
    return GRIPPER if kind == "gripper" else (kind == "pad") * len(_COLOURS) + _COLOURS.index(colour)


def targets(annotations: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, its visible things: names (B, K), (u, v) (B, K, 2), table (x, y, z) (B, K, 3)
    and a mask (B, K) for padding."""
    rows = []
    for scene in annotations:
        things = [(name_index(o["kind"], o["colour"]), o) for o in scene["objects"] if o["visible"]]
        if scene["gripper"]["visible"]:
            things.append((GRIPPER, scene["gripper"]))
        rows.append(things)
    k = max(1, max(len(r) for r in rows))
    names = torch.zeros(len(rows), k, dtype=torch.long)
    uv = torch.zeros(len(rows), k, 2)
    xyz = torch.zeros(len(rows), k, 3)
    mask = torch.zeros(len(rows), k, dtype=torch.bool)
    for b, things in enumerate(rows):
        for j, (name, o) in enumerate(things):
            names[b, j], mask[b, j] = name, True
            uv[b, j] = torch.tensor([o["u"], o["v"]])
            xyz[b, j] = torch.tensor([o["x"], o["y"], o["z"]])
    return names, uv, xyz, mask


class Locator(nn.Module):
    """name -> attention over the image tokens -> MLP -> (u, v) of that thing (and its table (x, y, z))."""

    def __init__(self, dim: int, width: int = 256, heads: int = 4, table: bool = False) -> None:
        super().__init__()
        self.names = nn.Embedding(NAMES, dim)
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = _mlp(2 * dim, width, 2)
        # built last, so the modules above start as they do without it
        self.table = _mlp(2 * dim, width, 3) if table else None

    def forward(self, tokens: torch.Tensor, names: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(u, v) in image fractions and, with ``table``, (x, y, z) in metres; (B, K, 2), (B, K, 3)."""
        query = self.names(names)
        memory = self.norm(tokens)
        pooled, _ = self.attend(query, memory, memory, need_weights=False)
        features = torch.cat([pooled, query], dim=-1)
        table = self.table(features) / TABLE_SCALE if self.table is not None else None
        return self.mlp(features) / SCALE + 0.5, table

    def loss(self, tokens: torch.Tensor, annotations: list[dict], table_weight: float = 0.0) -> torch.Tensor:
        """Smooth-L1 over every visible thing: in tenths of the image, plus ``table_weight`` times the
        table error in units of 4 cm."""
        names, uv, xyz, mask = targets(annotations)
        pred_uv, pred_xyz = self(tokens, names)
        err = nn.functional.smooth_l1_loss(pred_uv * SCALE, uv * SCALE, reduction="none", beta=0.1).sum(-1)
        if table_weight:
            err = err + table_weight * nn.functional.smooth_l1_loss(
                pred_xyz * TABLE_SCALE, xyz * TABLE_SCALE, reduction="none", beta=0.1).sum(-1)
        return (err * mask).sum() / mask.sum().clamp_min(1)


def _mlp(inputs: int, width: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, outputs))
