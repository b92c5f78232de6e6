"""Teacher samplers (state kept in float64, the denoiser called in float32) with one signature ``sampler(denoiser, noise, sigmas, labels)`` (Karras et al. 2022, Alg. 1-2)."""

from __future__ import annotations

import torch


@torch.no_grad()
def euler_sampler(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, labels=None) -> torch.Tensor:
    """Deterministic Euler on the probability-flow ODE dx/dσ = (x - D(x; σ)) / σ; sigmas end with 0."""
    return heun_sampler(denoiser, noise, sigmas, labels, second_order=False)


@torch.no_grad()
def heun_sampler(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, labels=None, second_order=True) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Algorithm 1): 2N - 1 network evaluations for N noise levels."""
    sigmas = sigmas.to(torch.float64)
    x = noise.to(torch.float64) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x.float(), sigma.float().expand(x.shape[0]), labels).double()) / sigma          # dx/dσ at σ
        x_next = x + (sigma_next - sigma) * d
        if second_order and sigma_next > 0:                                               # trapezoidal correction
            d_next = (x_next - denoiser(x_next.float(), sigma_next.float().expand(x.shape[0]), labels).double()) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = x_next
    return x.float()
