"""A generator's steps: one evaluation of the denoiser at σ_init z, or SiD-DiT's few (Zhou et al. 2025, "Score
Distillation of Flow Matching Models"; apple-aiml-research/ml-sid-dit, ``sid_dit_generate``).

K steps run on t_i = t_init (1 − i / K), i = 0 .. K − 1, in the teacher's own time; each starts from the last
step's x0 estimate re-noised to its level, x_i = D_{i−1} + σ_i n_i (x_0 = σ_0 z), with n_i new noise (``fresh``), z
again (``fixed``) or the noise the last step implies, (x_{i−1} − D_{i−1}) / σ_{i−1} (``ddim``). In EDM units that
is SiD-DiT's ``(1 − t) D + t n`` on flows and SiD-LSG's ``add_noise(D, n, t)`` on VP schedules.
"""

from __future__ import annotations

import math

import torch

from sid.precond import from_noise


def step_sigmas(denoiser, sigma_init: float, steps: int) -> list[float]:
    """σ_i of a K-step generator: t_i = t_init (1 − i / K) in the teacher's own time. A discrete schedule's rule
    gives its own (``DiscreteVPRule.step_sigmas``: timestep indices, truncated to integers as SiD-LSG's sampler
    does); any other uses the flow time t = σ / (1 + σ) (σ_init = ∞: t_init = 1), SiD-DiT's."""
    own = getattr(getattr(denoiser, "rule", None), "step_sigmas", None)
    if own is not None:
        return own(sigma_init, steps)
    t_init = 1.0 if math.isinf(sigma_init) else sigma_init / (1 + sigma_init)
    times = (t_init * (1 - i / steps) for i in range(1, steps))
    return [float(sigma_init), *(t / (1 - t) for t in times)]


def generate(denoiser, z: torch.Tensor, sigma_init: float, steps: int = 1, renoise: str = "fresh", labels=None,
             first: int | None = None, noise: list | None = None, on_step=None) -> torch.Tensor:
    """A generator's output from z: one evaluation at σ_init (``steps`` = 1), or the first ``first`` (default: all)
    of its K steps (``few_step``). ``on_step(i, σ_i, D_i)``: called after each step, its return is that step's
    output (a pipeline's callback may replace it)."""
    if steps == 1:
        d = from_noise(denoiser, z, sigma_init, labels)
        return d if on_step is None else on_step(0, float(sigma_init), d)
    return few_step(denoiser, z, step_sigmas(denoiser, sigma_init, steps)[:first or steps], renoise, labels, noise,
                    on_step)


def few_step(denoiser, z: torch.Tensor, sigmas: list[float], renoise: str = "fresh", labels=None,
             noise: list | None = None, on_step=None) -> torch.Tensor:
    """The generator's output after the steps at ``sigmas``: every step but the last without gradient, as SiD-DiT
    trains only the last one. ``noise``: the fresh noise of steps 1, 2, ... (default: drawn here); ``on_step``: as
    in ``generate``."""
    grad = torch.is_grad_enabled()
    x, n, d = None, z, None
    for i, sigma in enumerate(sigmas):
        if i:
            if renoise == "fresh":
                n = torch.randn_like(z) if noise is None else noise[i - 1]
            elif renoise == "ddim":                             # (x − D) / σ; at σ = ∞ (x = σ z) its limit, z
                n = n if x is None else (x - d) / sigmas[i - 1]
            else:
                n = z
        with torch.set_grad_enabled(grad and i == len(sigmas) - 1):
            if d is None:
                x = None if math.isinf(sigma) else sigma * z
                d = from_noise(denoiser, z, sigma, labels)
            else:
                x = d + sigma * n
                d = denoiser(x, torch.full((len(z),), sigma, device=z.device), labels)
        if on_step is not None:
            d = on_step(i, float(sigma), d)
    return d
