"""Action heads: what turns the action-query hidden states into a chunk of actions.

Each works on *normalised* actions and decodes a whole chunk from one VLM forward pass, through the
same three calls: ``head(hidden)`` (its output), ``decode(output)`` (the chunk) and ``loss(output, target,
mask)``. The flow-matching head (an action expert sampled by integration) is in ``flow.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContinuousHead(nn.Module):
    """OpenVLA-OFT style: one query token per future step, an MLP regresses its action, L1 loss."""

    def __init__(self, hidden_size: int, action_dim: int, chunk_size: int, width: int = 256):
        super().__init__()
        self.action_dim, self.chunk_size = action_dim, chunk_size
        self.num_queries = chunk_size
        self.mlp = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, action_dim),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, K, H) -> predicted normalised actions (B, K, A)."""
        return self.mlp(hidden.float())

    def decode(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def loss(self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masked L1: steps past the episode's end (mask False) count for nothing."""
        l1 = masked_mean((output - target).abs(), mask)
        return {"loss": l1, "l1": l1.detach()}


class DiscreteHead(nn.Module):
    """OpenVLA semantics: each action dimension in 256 uniform bins over [-1, 1], one
    vocabulary id per bin, scored by the VLM's own LM head; cross-entropy; decoded to
    the bin centre. One query token per (step, dimension), all decoded in parallel.

    The bins take the ``n_bins`` highest non-special token ids: byte-level BPE
    vocabularies put their rarest merges last, which is OpenVLA's "least-used" choice.
    """

    def __init__(self, lm_head: nn.Module, vocab_size: int, special_ids: list[int], action_dim: int,
                 chunk_size: int, n_bins: int = 256):
        super().__init__()
        ordinary = [i for i in range(vocab_size) if i not in set(special_ids)]
        if len(ordinary) < n_bins:
            raise ValueError(
                f"the tokenizer has only {len(ordinary)} ordinary tokens, fewer than n_bins={n_bins}: "
                "lower n_bins or use the continuous head"
            )
        self.action_dim, self.chunk_size, self.n_bins = action_dim, chunk_size, n_bins
        self.num_queries = chunk_size * action_dim
        self.register_buffer("bin_token_ids", torch.tensor(ordinary[-n_bins:]), persistent=False)
        edges = torch.linspace(-1, 1, n_bins + 1)
        self.register_buffer("bin_centres", (edges[:-1] + edges[1:]) / 2, persistent=False)
        self._lm_head = [lm_head]  # a list, so the frozen base's head is not registered (nor saved) here

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, K*A, H) -> logits over the bins (B, K, A, n_bins)."""
        logits = self._lm_head[0](hidden)[..., self.bin_token_ids].float()
        return logits.view(hidden.shape[0], self.chunk_size, self.action_dim, self.n_bins)

    def to_bins(self, actions: torch.Tensor) -> torch.Tensor:
        """Normalised actions in [-1, 1] -> bin indices."""
        return ((actions.clamp(-1, 1) + 1) / 2 * self.n_bins).long().clamp(max=self.n_bins - 1)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        return self.bin_centres[logits.argmax(-1)]

    def loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy over bins on valid steps, plus token accuracy and the L1 of the decoded chunk."""
        bins = self.to_bins(target)
        ce = F.cross_entropy(logits.flatten(0, 2), bins.flatten(), reduction="none").view_as(bins)
        with torch.no_grad():
            accuracy = masked_mean((logits.argmax(-1) == bins).float(), mask)
            l1 = masked_mean((self.decode(logits) - target).abs(), mask)
        return {"loss": masked_mean(ce, mask), "token_accuracy": accuracy, "l1": l1}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's valid steps (all dimensions), then over the samples that have any.
    A grounding-only sample (play scenes, ``data.grounding_paths``) has none: counting it too would
    shrink the action loss and the logged L1 by the batch's demonstration share (by half at the
    demo's ``grounding_fraction`` 0.5, which made a training L1 of 0.10 read 0.05). Under DDP the
    processes' means then average to the batch's mean when they hold equally many such samples."""
    weight = mask.to(values.dtype).unsqueeze(-1).expand_as(values)
    valid = weight.flatten(1).sum(1)
    per_sample = (values * weight).flatten(1).sum(1) / valid.clamp(min=1)
    return per_sample.sum() / (valid > 0).sum().clamp(min=1)
