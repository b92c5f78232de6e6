"""The two losses of identity-based distillation, as pure per-sample functions (sid-math.md §2.3-§3.7).

Every function returns one value per sample ([B]); reduction, loss scaling, NaN policy and optimisers
belong to the trainer.
"""

from __future__ import annotations

from typing import Callable

import torch

from sid.errors import SidError

# λ of L_λ = <f_φ - f_ψ, (f_φ - x_g) - λ (f_φ - f_ψ)> (sid-math.md §3.7); λ is SiD's α.
LAMBDA_PRESETS = {
    "sid": 1.2,       # SiD default: ½Q - 0.2P
    "lambda1": 1.0,   # fake-score channel only, ½Q (SiD-LSG, SiDA, FGM in practice)
    "fgm": 0.5,       # exact gradient ½∇D; equals ½(|f_φ - x_g|² - |f_ψ - x_g|²)
    "l2": 0.0,        # SiD's L2 alone, ½Q + P
}
WEIGHTINGS = ("sid", "x0", "eps")


def resolve_lam(lam: str | float) -> float:
    """A preset name or a number -> λ."""
    if str(lam) in LAMBDA_PRESETS:
        return LAMBDA_PRESETS[str(lam)]
    try:
        return float(lam)
    except ValueError:
        raise SidError(f"loss.lam={lam!r} is neither a number nor a preset; presets: {LAMBDA_PRESETS}") from None


def _sum_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ_EDM(σ) = (σ² + σ_d²) / (σ σ_d)² (Karras et al. 2022, Eq. 8; sid-math.md §1.4)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_loss(
    denoiser: Callable, x0: torch.Tensor, sigma: torch.Tensor, labels=None, *, sigma_data: float
) -> torch.Tensor:
    """EDM denoising score matching: λ_EDM(σ) Σ_j (D(x0 + σn) - x0)_j² (Karras et al. 2022, Eq. 2 and 8).

    The fake score's loss on (detached) generator samples x0 = x_g (sid-math.md §2.3 step 4), and the loss
    that trains a teacher on data. ``sigma`` is [B].
    """
    return edm_loss_weight(sigma, sigma_data) * _squared_error(denoiser, x0, sigma, labels)


fake_score_loss = denoising_loss  # f_ψ fits the generator's samples with the teacher's own training loss


def flow_matching_loss(denoiser: Callable, x0: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
    """Rectified-flow matching ‖v̂ - v‖², v = ε - x0 at x_t = (1 - t) x0 + t ε (Liu et al. 2022; SD3), in EDM units:
    σ = t / (1 - t) and D = x_t - t v̂ (sid-math.md §1.3), so v̂ - v = (x0 - D) / t and the weight is 1/t².
    ln σ = logit t: a log-normal σ is SD3's logit-normal t."""
    t = sigma / (1 + sigma)
    return _squared_error(denoiser, x0, sigma, labels) / t**2


def _squared_error(denoiser: Callable, x0: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
    """Σ_j (D(x0 + σn; σ) - x0)_j² per sample, n ~ N(0, I)."""
    s = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    return _sum_per_sample((denoiser(x0 + s * torch.randn_like(x0), sigma, labels) - x0) ** 2)


def identity_loss(f_teacher: torch.Tensor, f_fake: torch.Tensor, x_g: torch.Tensor, lam: float) -> torch.Tensor:
    """L^x0_λ = Σ_j (f_φ - f_ψ)_j [(f_φ - x_g)_j - λ (f_φ - f_ψ)_j] (sid-math.md §2.5, §3.7)."""
    delta = f_teacher - f_fake
    return _sum_per_sample(delta * ((f_teacher - x_g) - lam * delta))


def sid_weight(x_g: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
    """SiD's per-sample ω = 1 / max(mean_j |x_g - f_φ|_j, 1e-5), stop-gradient (§2.4 step 5)."""
    return 1 / (x_g - f_teacher).detach().abs().flatten(1).mean(1).clamp_min(1e-5)


def loss_weight(weighting: str, sigma: torch.Tensor, x_g: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of the generator loss: ``sid`` (ω above), ``x0`` (1), ``eps`` (1/σ², the ε-form of §2.5)."""
    if weighting == "sid":
        return sid_weight(x_g, f_teacher)
    if weighting == "x0":
        return torch.ones_like(sigma)
    if weighting == "eps":
        return sigma**-2
    raise SidError(f"loss.weighting={weighting!r} is unknown; choose one of {WEIGHTINGS}")


def generator_loss(
    teacher: Callable,
    fake_score: Callable,
    x_g: torch.Tensor,
    sigma: torch.Tensor,
    labels=None,
    *,
    lam: float,
    weighting: str = "sid",
) -> torch.Tensor:
    """w · L^x0_λ at x_t = x_g + σn (§2.4): gradients reach θ through x_g and, via x_t, through both f_φ and f_ψ.

    Neither prediction is detached: the caller freezes the parameters of both networks, not their inputs.
    """
    s = sigma.reshape(-1, *[1] * (x_g.ndim - 1))
    x_t = x_g + s * torch.randn_like(x_g)
    f_teacher = teacher(x_t, sigma, labels)
    f_fake = fake_score(x_t, sigma, labels)
    return loss_weight(weighting, sigma, x_g, f_teacher) * identity_loss(f_teacher, f_fake, x_g, lam)
