"""Teacher samplers with one signature ``sampler(denoiser, noise, sigmas, labels)`` (Karras et al. 2022, Alg. 1-2).

The state is kept in float64; the denoiser is called in float32.
"""

from __future__ import annotations

import torch

from sid.generator import OneStepGenerator
from sid.guidance import guided, part
from sid.schedules import karras_sigmas


def denoise(denoiser, x: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
    """D(x; σ) of the float64 state, the denoiser called in float32."""
    return denoiser(x.float(), sigma.float().expand(x.shape[0]), labels).double()


def slope(denoiser, x: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
    """dx/dσ = (x - D(x; σ)) / σ of the probability-flow ODE (Karras et al. 2022, Eq. 3)."""
    return (x - denoise(denoiser, x, sigma, labels)) / sigma


@torch.no_grad()
def euler_sampler(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, labels=None) -> torch.Tensor:
    """Deterministic Euler on the probability-flow ODE dx/dσ = (x - D(x; σ)) / σ; sigmas end with 0."""
    return heun_sampler(denoiser, noise, sigmas, labels, second_order=False)


@torch.no_grad()
def heun_sampler(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, labels=None, second_order=True) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Algorithm 1): 2N - 1 network evaluations for N noise levels."""
    sigmas = sigmas.to(torch.float64)
    if torch.isinf(sigmas[0]):          # t = 1 (a flow's own schedules start there): the first step is Euler's from
        z = noise.to(torch.float64)     # pure noise, x_1 = D(z; ∞) + σ_1 z (the denoiser is given z itself at σ = ∞)
        x = denoise(denoiser, z, sigmas[0], labels) + sigmas[1] * z
        sigmas = sigmas[1:]
    else:
        x = noise.to(torch.float64) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = slope(denoiser, x, sigma, labels)                                              # dx/dσ at σ
        x_next = x + (sigma_next - sigma) * d
        if second_order and sigma_next > 0:                                               # trapezoidal correction
            d_next = slope(denoiser, x_next, sigma_next, labels)
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = x_next
    return x.float()


@torch.no_grad()
def sample_teacher(denoiser, shape, steps: int, solver: str, seeds, classes=None, device=None, batch=256,
                   cond=None, guidance: float = 1.0, guide=None, sigmas=None):
    """The teacher's probability-flow ODE (Heun: 2·steps − 1 evaluations, or Euler: steps) from the same
    per-seed noise a one-step generator gets for those seeds (``OneStepGenerator.inputs_for_seeds``).
    ``cond``: one condition per seed (e.g. encoded prompts), in place of ``classes``; ``guidance``: guidance of that
    strength as ``guide(denoiser, guidance)`` applies it (``Teacher.guide``; default: none possible but κ = 1);
    ``sigmas``: the noise levels, ending with 0 (default: EDM's Karras schedule of ``steps``)."""
    z, labels = OneStepGenerator(denoiser, shape).inputs_for_seeds(list(seeds), classes, device)
    labels = labels if cond is None else cond
    if sigmas is None:
        sigmas = karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max, device=device)
    net = (guide or (lambda d, scale: guided(d, scale, None)))(denoiser, guidance)
    sampler = heun_sampler if solver == "heun" else euler_sampler
    return torch.cat([sampler(net, z[i:i + batch], sigmas, part(labels, slice(i, i + batch)))
                      for i in range(0, len(z), batch)]).cpu()
