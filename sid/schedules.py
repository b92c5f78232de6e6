"""Noise-level distributions and grids, all in EDM sigma units (Karras et al. 2022; SiD)."""

from __future__ import annotations

import torch


def sample_lognormal_sigma(n: int, p_mean: float, p_std: float, *, device=None) -> torch.Tensor:
    """ln sigma ~ N(p_mean, p_std^2): the EDM training distribution of the fake-score loss."""
    return (torch.randn(n, device=device) * p_std + p_mean).exp()


def karras_sigma(u: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """sigma(u) = (sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, u in [0, 1] (Karras Eq. 5)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + u * (hi - lo)) ** rho


def sample_sid_sigma(n: int, t_max: float, sigma_min: float, sigma_max: float, rho: float, *, device=None):
    """SiD's generator-loss noise levels: u ~ U[0, t_max), sigma = karras_sigma(u) (t_max = 800/1000 in SiD)."""
    return karras_sigma(torch.rand(n, device=device) * t_max, sigma_min, sigma_max, rho)


def sample_timestep_sigma(n: int, sigmas: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """A discrete teacher's own noise levels: k ~ U{lo, ..., hi}, sigma = sigmas[k] (SiD-LSG: t ~ U{20..979},
    ``torch.randint(20, 980)``), drawn on ``sigmas``' device."""
    return sigmas[torch.randint(lo, hi + 1, (n,), device=sigmas.device)]


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, device=None):
    """The decreasing Karras sampling grid sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, then 0 appended."""
    u = torch.linspace(1, 0, num_steps, dtype=torch.float64, device=device)
    sigmas = karras_sigma(u, sigma_min, sigma_max, rho)
    return torch.cat([sigmas, sigmas.new_zeros(1)])
