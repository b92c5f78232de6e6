"""Exact denoisers of Gaussian mixtures: teachers with a known answer, for tests and toy runs (sid-math.md T2)."""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianMixture(nn.Module):
    """p_0 = Σ_k π_k N(μ_k, s_k² I) on samples of any shape, with its exact denoiser E[x_0 | x_0 + σn = x].

    D(x; σ) = Σ_k r_k(x) [μ_k + s_k² / (s_k² + σ²) (x - μ_k)],  r_k ∝ π_k N(x; μ_k, (s_k² + σ²) I).
    Computed in float64 whatever the input; returned in the input's dtype (float32 at least).
    """

    def __init__(self, weights, means, stds, *, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data=None):
        super().__init__()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("log_weights", (weights / weights.sum()).log())        # [K]
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))  # [K, *shape]
        self.register_buffer("stds", torch.as_tensor(stds, dtype=torch.float64).expand(len(weights)).clone())
        self.shape = tuple(self.means.shape[1:])
        self.sigma_min, self.sigma_max, self.label_dim = sigma_min, sigma_max, 0
        self.sigma_data = float(self.data_std()) if sigma_data is None else sigma_data

    def data_std(self) -> torch.Tensor:
        """Per-coordinate standard deviation of the mixture, averaged over coordinates."""
        w = self.log_weights.exp()
        mean = torch.einsum("k,kd->d", w, self.means.flatten(1))
        second = torch.einsum("k,kd->d", w, self.means.flatten(1) ** 2 + self.stds[:, None] ** 2)
        return (second - mean**2).mean().sqrt()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, *self.shape, dtype=torch.float64, generator=generator, device=self.means.device)
        return self.means[k] + self.stds[k].view(-1, *[1] * len(self.shape)) * noise

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """r_k(x) at noise level σ: [B, K]."""
        var = self.stds**2 + sigma.reshape(-1, 1) ** 2                                # [B, K]
        sq = (x.flatten(1)[:, None, :] - self.means.flatten(1)[None]).pow(2).sum(-1)   # [B, K]
        d = math.prod(self.shape)
        logits = self.log_weights - 0.5 * d * var.log() - sq / (2 * var)
        return logits.softmax(dim=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels=None) -> torch.Tensor:
        out_dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.double()
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        r = self.responsibilities(x, sigma)                                            # [B, K]
        shrink = self.stds**2 / (self.stds**2 + sigma[:, None] ** 2)                  # [B, K]
        xf, mu = x.flatten(1)[:, None, :], self.means.flatten(1)[None]                 # [B, 1, d], [1, K, d]
        posterior_means = mu + shrink[..., None] * (xf - mu)                           # [B, K, d]
        return torch.einsum("bk,bkd->bd", r, posterior_means).view_as(x).to(out_dtype)


def ring_mixture(modes: int = 8, radius: float = 2.0, std: float = 0.2, shape=(2,), seed: int = 0, weights=None):
    """K modes on a circle of the given radius in the first two coordinates (2-D), or, for larger shapes,
    K random directions scaled to the radius (a fixed seed makes them reproducible)."""
    shape = tuple(shape)
    if shape == (2,):
        angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    else:
        g = torch.Generator().manual_seed(seed)
        directions = torch.randn(modes, math.prod(shape), dtype=torch.float64, generator=g)
        means = (radius * directions / directions.norm(dim=1, keepdim=True) * math.sqrt(math.prod(shape)))
        means = means.view(modes, *shape)
    weights = torch.ones(modes) if weights is None else torch.as_tensor(weights)
    return GaussianMixture(weights, means, torch.full((modes,), std))


def mode_weights(mixture: GaussianMixture, samples: torch.Tensor, max_dist: float = 3.0) -> torch.Tensor:
    """Fraction of samples nearest to each mode, counting only those within max_dist component stds of it;
    the remainder (samples between or far from all modes) is the last entry. [K + 1]"""
    d = torch.cdist(samples.double().flatten(1), mixture.means.flatten(1))          # [N, K]
    dist, k = d.min(dim=1)
    k = torch.where(dist <= max_dist * mixture.stds[k] * math.sqrt(math.prod(mixture.shape)), k, len(mixture.stds))
    return torch.bincount(k, minlength=len(mixture.stds) + 1).double() / len(samples)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size sample sets (random directions, fixed seed)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, dtype=torch.float64, generator=g)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(dim=0).values, (b @ dirs).sort(dim=0).values
    return float((pa - pb).abs().mean())
