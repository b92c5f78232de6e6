"""Small backbones owned by the project: the MLP student used with analytic (toy) teachers."""

from __future__ import annotations

import math

import torch
from torch import nn


class NoiseEmbedding(nn.Module):
    """Fourier features of c_noise (= ln σ / 4 under EDM preconditioning) at fixed log-spaced frequencies."""

    def __init__(self, dim: int = 32, max_freq: float = 64.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), dim // 2)), persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.float()[:, None] * self.freqs                           # [B, dim/2]
        return torch.cat([angles.sin(), angles.cos()], dim=1)                    # [B, dim]


class MLP(nn.Module):
    """``F(x_in, c_noise, labels)`` for samples of any shape, flattened: SiLU layers of constant width."""

    def __init__(self, shape: tuple[int, ...], width: int = 128, depth: int = 3, label_dim: int = 0, emb_dim: int = 32):
        super().__init__()
        self.shape, self.label_dim = tuple(shape), label_dim
        dim = math.prod(self.shape)
        self.embed = NoiseEmbedding(emb_dim)
        layers, fan_in = [], dim + emb_dim + label_dim
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.SiLU()]
            fan_in = width
        self.body = nn.Sequential(*layers, nn.Linear(fan_in, dim))

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = [x_in.flatten(1), self.embed(c_noise).to(x_in.dtype)]
        if self.label_dim:
            h.append(labels.to(x_in.dtype))
        return self.body(torch.cat(h, dim=1)).view(-1, *self.shape)
