"""The flow-matching action head (pi0 / SmolVLA / GR00T style): a small action expert that turns
Gaussian noise into a normalised action chunk by integrating a learned velocity field, conditioned
on the action queries' final hidden states.

Regression (L1) puts a chunk between the modes of multimodal demonstrations; a flow samples one of
them. The VLM runs once per chunk: ``forward`` projects the query states to the expert's width, and
``decode`` runs the ``steps`` Euler steps through the expert alone.

Conventions are pi0's: time 1 is noise, 0 the data; ``x_t = t * noise + (1 - t) * actions``, the
target velocity ``noise - actions``; training times ``t = 0.001 + 0.999 * Beta(1.5, 1)`` (more weight
on the noisy end). Sampling starts from one noise draw per ``seed``, shared by every row and every
call, so a policy acts as a deterministic function of its observation: a row of a batch equals that
observation alone, and test-time crops average samples of the same draw.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vla_peft.policy.heads import masked_mean

TIME_ALPHA = 1.5  # Beta(1.5, 1): pi0's time distribution


class ActionExpert(nn.Module):
    """Velocity of the noisy chunk: a few pre-norm transformer blocks over the K steps of the chunk
    (so its steps agree on one mode), each step's token = its noisy action + its query's
    conditioning + the time."""

    def __init__(self, action_dim: int, chunk_size: int, width: int, layers: int):
        super().__init__()
        self.width = width
        self.action_in = nn.Linear(action_dim, width)
        self.position = nn.Parameter(torch.zeros(chunk_size, width))
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, action_dim))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of t in [0, 1], (B,) -> (B, width); pi0's periods, 4e-3 to 4."""
        fraction = torch.linspace(0.0, 1.0, self.width // 2, device=t.device)
        period = 4e-3 * (4.0 / 4e-3) ** fraction
        angles = 2 * math.pi * t[:, None] / period[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, K, A) noisy chunk, (B,) time, (B, K, W) conditioning -> velocity (B, K, A)."""
        tokens = self.action_in(x) + cond + self.position + self.time_mlp(self.time_embedding(t))[:, None]
        for block in self.blocks:
            tokens = block(tokens)
        return self.out(tokens)


class FlowHead(nn.Module):
    """One query token per future step; its hidden state conditions the expert's token for that step."""

    def __init__(self, hidden_size: int, action_dim: int, chunk_size: int, width: int = 256, layers: int = 2,
                 steps: int = 10, seed: int = 0):
        super().__init__()
        if width % 4 or width < 8:
            raise ValueError(f"policy config: head_width={width} is invalid for the flow head: use a multiple of 4 "
                             "(its attention has 4 heads), e.g. 128")
        self.action_dim, self.chunk_size, self.steps, self.seed = action_dim, chunk_size, steps, seed
        self.num_queries = chunk_size
        self.condition = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width))
        self.expert = ActionExpert(action_dim, chunk_size, width, layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, K, H) query states -> the expert's conditioning (B, K, W); the VLM's part ends here."""
        return self.condition(hidden.float())

    def noise(self, batch: int, device: torch.device, seed: int | None = None) -> torch.Tensor:
        """The starting noise of ``seed`` (default: the head's): one (K, A) draw for every row."""
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        draw = torch.randn(self.chunk_size, self.action_dim, generator=generator)
        return draw.to(device).expand(batch, -1, -1)

    def sample(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Euler integration of the velocity from t=1 (``noise``) to t=0: ``steps`` expert passes."""
        x, dt = noise, 1.0 / self.steps
        for i in range(self.steps):
            t = torch.full((cond.shape[0],), 1.0 - i * dt, device=cond.device)
            x = x - dt * self.expert(x, t, cond)
        return x

    def decode(self, cond: torch.Tensor) -> torch.Tensor:
        """Normalised action chunks (B, K, A), from the head's seeded noise."""
        return self.sample(cond, self.noise(cond.shape[0], cond.device))

    def loss(self, cond: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditional flow matching: the masked MSE of the velocity on valid steps. In eval mode
        (validation) times and noise come from a fixed generator, so validation losses compare across
        evaluations and draw nothing from the training run's random stream, and the L1 of the chunk
        sampled from the seeded noise is reported too."""
        batch = target.shape[0]
        generator = None if self.training else torch.Generator().manual_seed(self.seed + 1)
        uniform = torch.rand(batch, generator=generator).to(target.device)
        noise = torch.randn(target.shape, generator=generator).to(target.device)
        t = 0.001 + 0.999 * uniform.pow(1.0 / TIME_ALPHA)  # inverse CDF of Beta(alpha, 1): u ** (1 / alpha)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * target
        velocity = self.expert(x_t, t, cond)
        mse = masked_mean((velocity - (noise - target)).pow(2), mask)
        result = {"loss": mse, "flow_mse": mse.detach()}
        if not self.training:  # sampling costs `steps` expert passes: only for validation
            with torch.no_grad():
                result["l1"] = masked_mean((self.decode(cond) - target).abs(), mask)
        return result
