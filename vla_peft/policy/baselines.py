"""Small behaviour-cloning policies without a VLM, to set a pretrained base's figures beside.

``StateMLP`` reads only the state (given the true object positions it is a control bound);
``PixelCNN`` is what a user would otherwise train from scratch: a few conv layers with FiLM on
the instruction's colour words, spatial-softmax keypoints and the state. ``BaselinePolicy``
puts either behind VLAPolicy's acting interface (``config``, ``normalizers``, ``predict_chunk``),
so the toolkit's evaluator rolls them out unchanged; both predict action chunks like the policy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla_peft.data.augment import ImageAugment, to_float_chw
from vla_peft.data.stats import Normalizer
from vla_peft.policy.config import PolicyConfig

COLOUR_WORDS = ("red", "green", "blue", "yellow")  # the tasks' colours (envs/scene.py)
COLOUR_SLOTS = 2  # the instruction's first two colour words: the object, then its goal


def colour_ids(instructions: list[str]) -> torch.Tensor:
    """(B, COLOUR_SLOTS) indices into COLOUR_WORDS of each instruction's colour words in order;
    ``len(COLOUR_WORDS)`` marks a slot the instruction leaves empty."""
    rows = []
    for text in instructions:
        words = [COLOUR_WORDS.index(w) for w in text.lower().replace(",", " ").split() if w in COLOUR_WORDS]
        rows.append((words + [len(COLOUR_WORDS)] * COLOUR_SLOTS)[:COLOUR_SLOTS])
    return torch.tensor(rows, dtype=torch.long)


def masked_l1(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |error| over the chunk steps inside the episode (the policy head's loss)."""
    weights = mask.unsqueeze(-1).float().expand_as(target)
    return ((predicted - target).abs() * weights).sum() / weights.sum().clamp(min=1)


class StateMLP(nn.Module):
    """Normalised state (B, S) -> normalised action chunk (B, K, A)."""

    needs_images = False

    def __init__(self, state_dim: int, action_dim: int, chunk_size: int, width: int = 256):
        super().__init__()
        self.chunk_size, self.action_dim = chunk_size, action_dim
        self.mlp = nn.Sequential(nn.Linear(state_dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, chunk_size * action_dim))

    def forward(self, images, state: torch.Tensor, colours) -> torch.Tensor:
        return self.mlp(state).view(-1, self.chunk_size, self.action_dim)


class SpatialSoftmax(nn.Module):
    """(B, C, H, W) feature maps -> (B, 2C) expected (x, y) in [-1, 1] of each channel's softmax."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        weights = features.flatten(2).softmax(-1).view(batch, channels, height, width)
        ys = torch.linspace(-1, 1, height, device=features.device)
        xs = torch.linspace(-1, 1, width, device=features.device)
        return torch.cat([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], dim=1)


class PixelCNN(nn.Module):
    """Image (B, 3, H, W) in [0, 1], state and colour words -> normalised action chunk (B, K, A).

    Each conv layer's features are scaled and shifted (FiLM) by the colour words, so the keypoints
    the spatial softmax finds can follow the named cube and pad."""

    needs_images = True

    def __init__(self, state_dim: int, action_dim: int, chunk_size: int, channels: tuple[int, ...] = (32, 32, 64, 64),
                 width: int = 256):
        super().__init__()
        self.chunk_size, self.action_dim = chunk_size, action_dim
        strides = (2, 1, 2, 1)
        self.convs = nn.ModuleList()
        last = 3
        for out, stride in zip(channels, strides):
            self.convs.append(nn.Conv2d(last, out, 5 if last == 3 else 3, stride, padding=2 if last == 3 else 1))
            last = out
        self.colour = nn.Embedding(COLOUR_SLOTS * (len(COLOUR_WORDS) + 1), 32)
        self.film = nn.Linear(COLOUR_SLOTS * 32, 2 * sum(channels))
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)  # starts as the identity: scale 1, shift 0
        self.keypoints = SpatialSoftmax()
        self.mlp = nn.Sequential(nn.Linear(2 * last + state_dim + COLOUR_SLOTS * 32, width), nn.GELU(),
                                 nn.Linear(width, width), nn.GELU(), nn.Linear(width, chunk_size * action_dim))

    def forward(self, images: torch.Tensor, state: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
        slots = colours + torch.arange(COLOUR_SLOTS, device=colours.device) * (len(COLOUR_WORDS) + 1)
        words = self.colour(slots).flatten(1)
        film = self.film(words).split([2 * conv.out_channels for conv in self.convs], dim=1)
        x = (images - 0.5) / 0.25
        for conv, params in zip(self.convs, film):
            scale, shift = params.chunk(2, dim=1)
            x = F.relu(conv(x) * (1 + scale[..., None, None]) + shift[..., None, None])
        features = torch.cat([self.keypoints(x), state, words], dim=1)
        return self.mlp(features).view(-1, self.chunk_size, self.action_dim)


class BaselinePolicy(nn.Module):
    """A small network acting as a chunking policy: raw observations in, raw actions out.

    ``config`` carries the chunking, cameras and state keys the evaluator reads; ``center_crop`` < 1
    applies the augmentation's evaluation crop, as VLAPolicy does."""

    def __init__(self, net: nn.Module, config: PolicyConfig, normalizers: dict[str, Normalizer]):
        super().__init__()
        self.net, self.config, self.normalizers = net, config, normalizers
        self._eval_crop = ImageAugment(crop_scale=config.center_crop) if config.center_crop < 1 else None

    def loss(self, images: torch.Tensor | None, state: torch.Tensor, instructions: list[str],
             actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked L1 on normalised actions, from a training batch (images already augmented)."""
        return masked_l1(self.net(images, state, colour_ids(instructions)), actions, mask)

    @torch.no_grad()
    def predict_chunk(self, obs: dict, binarize_gripper: bool | None = None) -> np.ndarray:
        """Raw actions (K, A) for one observation, or (B, K, A) for a batch (``instruction`` a list)."""
        single = isinstance(obs["instruction"], str)
        if single:
            obs = {k: ([v] if k == "instruction" else np.asarray(v)[None]) for k, v in obs.items()}
        batch = len(obs["instruction"])
        for key in self.config.state_keys:
            if key not in obs:
                raise KeyError(f"observation has no state key {key!r} (it has {sorted(obs)}): fix policy.state_keys")
        state = np.concatenate([np.asarray(obs[k], np.float32).reshape(batch, -1) for k in self.config.state_keys], -1)
        state = self.normalizers["state"].normalize(torch.from_numpy(state))
        images = None
        if self.net.needs_images:
            images = to_float_chw(obs[f"{self.config.cameras[0]}_rgb"])
            images = self._eval_crop.eval(images) if self._eval_crop is not None else images
        chunk = self.net(images, state, colour_ids(list(obs["instruction"])))
        actions = self.normalizers["actions"].unnormalize(chunk.float())
        grip = self.config.gripper_index
        if grip is not None and (self.config.binarize_gripper if binarize_gripper is None else binarize_gripper):
            actions[..., grip] = torch.where(actions[..., grip] >= 0, 1.0, -1.0)
        actions = actions.numpy().astype(np.float32)
        return actions[0] if single else actions
