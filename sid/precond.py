"""The denoiser contract ``D(x, sigma, labels) -> x0_hat`` and EDM preconditioning (sid-math.md §1.3)."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.utils.checkpoint
from torch import nn


class Denoiser(Protocol):
    """Every network the trainer touches: ``x = x0 + sigma * n`` in, ``E[x0 | x]`` out (EDM units, float32)."""

    sigma_min: float
    sigma_max: float
    sigma_data: float
    label_dim: int                      # 0: unconditional; else one-hot class labels of this size

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...


class Coefficients(NamedTuple):
    """``D(x; sigma) = c_skip * x + c_out * F(c_in * x, c_noise)`` (sid-math.md §1.3)."""

    c_skip: torch.Tensor                # each [B, 1, ..., 1]
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor               # what the raw network is fed as its time input


class EDMPrecond(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1): the rule for networks trained the EDM way."""

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        total = sigma**2 + self.sigma_data**2
        return Coefficients(
            c_skip=self.sigma_data**2 / total,
            c_out=sigma * self.sigma_data / total.sqrt(),
            c_in=1 / total.sqrt(),
            c_noise=sigma.log() / 4,
        )


class FlowPrecond(nn.Module):
    """Rectified flow / flow matching: ``x_t = (1 - t) x0 + t ε`` with the network predicting ``v = ε - x0``
    (SD3, FLUX). In EDM units ``σ = t / (1 - t)``, ``x_t = x / (1 + σ)`` and ``D = x_t - t v̂`` (sid-math.md §1.3,
    the RF row); the network is fed ``t`` times its own timestep scale (diffusers' flow-matching schedulers:
    ``num_train_timesteps``). A sampling "shift" only re-spaces a schedule and is not applied here."""

    def __init__(self, timestep_scale: float = 1000.0, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__()
        self.timestep_scale = timestep_scale
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        t = sigma / (1 + sigma)
        return Coefficients(c_skip=1 - t, c_out=-t, c_in=1 - t, c_noise=t * self.timestep_scale)


def broadcast_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-sample sigma ([], [B] or [B, 1, ...]) as [B, 1, ..., 1] in x's dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *[1] * (x.ndim - 1)).expand(x.shape[0], *[1] * (x.ndim - 1))


class Preconditioned(nn.Module):
    """A raw network ``F(x_in, c_noise, labels)`` made a denoiser by a coefficient rule (``precond``).

    Owns the precision boundary: x, sigma and the output are float32 (float64 stays float64), the
    coefficients are computed in that precision, and only the backbone runs under the caller's autocast.
    """

    def __init__(self, net: nn.Module, precond: nn.Module, label_dim: int = 0):
        super().__init__()
        self.net, self.precond, self.label_dim = net, precond, label_dim
        self.checkpoint = False         # recompute the backbone's activations in backward (perf.grad_checkpointing)

    sigma_min = property(lambda self: self.precond.sigma_min)
    sigma_max = property(lambda self: self.precond.sigma_max)
    sigma_data = property(lambda self: self.precond.sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        c = self.precond(broadcast_sigma(sigma, x))
        inputs = (c.c_in * x, c.c_noise.flatten(), labels)
        if self.checkpoint and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(self.net, *inputs, use_reentrant=False)
        else:
            out = self.net(*inputs)
        return c.c_skip * x + c.c_out * out.to(x.dtype)
