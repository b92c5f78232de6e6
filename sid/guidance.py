"""Conditions as the denoiser contract carries them, and classifier-free guidance on a denoiser.

A condition ``cond`` is whatever a teacher family's network needs, batch first: ``None`` (unconditional), a
tensor (one-hot class labels), or a dict of tensors (text embeddings, pooled embeddings, masks, SDXL's time
ids). Only adapters look inside; everything else batches, selects and passes it on with the helpers here.

Guidance (sid-math §1.3): at fixed (x, σ) a denoiser is affine in its network's output, so CFG on ε, on v or
on D is the same thing, ``D_κ = D_u + κ (D_c − D_u)``; ``guided`` evaluates both halves in one batched forward.
"""

from __future__ import annotations

from typing import Callable

import torch


def concat(a, b):
    """Two conditions (or tensors) of the same structure, one batch after the other."""
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: concat(a[k], b[k]) for k in a}
    return torch.cat([a, b.to(a)])


def where(keep: torch.Tensor, a, b):
    """Per sample, ``a`` where ``keep`` (a bool tensor [B]) holds, else ``b``: e.g. a prompt or the null one."""
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: where(keep, a[k], b[k]) for k in a}
    return torch.where(keep.reshape(-1, *[1] * (a.ndim - 1)), a, b.to(a))


def part(cond, index):
    """The samples ``index`` (a slice or index tensor) of a condition."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: part(v, index) for k, v in cond.items()}
    return cond[index]


def size(cond) -> int | None:
    """The batch size of a condition (None for the unconditional one)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return size(next(iter(cond.values())))
    return len(cond)


def guided(denoiser: Callable, scale: float, null: Callable[[int], object]) -> Callable:
    """``denoiser`` under classifier-free guidance of strength ``scale`` (κ): D_u + κ (D_c − D_u), where D_u
    sees the family's null condition ``null(n)``. κ = 1 is the conditional denoiser itself (one forward, the
    same numbers); otherwise the conditional and unconditional halves run as one batch of 2n."""
    if scale == 1:
        return denoiser

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond, **kwargs) -> torch.Tensor:
        n = len(x)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(n)
        extra = {k: torch.cat([v, v]) for k, v in kwargs.items()}        # augment labels: the same input in both
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), concat(cond, null(n)), **extra)
        d_c, d_u = both[:n], both[n:]
        return d_u + scale * (d_c - d_u)

    return denoise


def embedded(denoiser: Callable, scale: float) -> Callable:
    """A guidance-distilled ``denoiser`` (FLUX.1-dev) guided by its own input: the strength κ given in each
    condition's "guidance" (one forward, the network's guidance embedding), not two halves."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, cond: dict, **kwargs) -> torch.Tensor:
        return denoiser(x, sigma, {**cond, "guidance": torch.full((len(x),), float(scale), device=x.device)}, **kwargs)

    return denoise


def drop(cond, rate: float, null: Callable[[int], object], generator: torch.Generator | None = None):
    """Each sample's condition replaced by the null one with probability ``rate`` (SiD-LSG's prompt dropout in
    the fake-score step); rate 0 returns ``cond`` itself."""
    n = size(cond)
    if not rate or n is None:
        return cond
    device = next(iter(cond.values())).device if isinstance(cond, dict) else cond.device
    keep = torch.rand(n, device=device, generator=generator) >= rate
    return where(keep, cond, null(n))
