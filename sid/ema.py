"""Exponential moving average of the generator by half-life in images, with ramp-up (EDM, Karras et al. 2022;
SiD's training loop)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def holders(module: nn.Module) -> list[nn.Module]:
    """The modules that hold parameters themselves (linear, convolution and norm layers, ...)."""
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]


def sharing_memo(module: nn.Module, shared) -> dict:
    """A ``copy.deepcopy`` memo under which a copy of ``module`` keeps the ``shared`` tensors (ids) and the very
    modules that hold only those: sharding such a module (``sid.sharding.shard_holders``) then shards it in every
    network that holds it."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers()) if id(t) in shared}
    memo.update({id(m): m for m in holders(module) if all(id(p) in shared for p in m.parameters(recurse=False))})
    return memo


def ema_beta(batch: int, cur_nimg: int, halflife_nimg: float, rampup: float | None) -> float:
    """β = 0.5^(batch / halflife), halflife = min(halflife_nimg, rampup * cur_nimg) (SiD / EDM), where
    ``cur_nimg`` counts the images seen before this step's were added."""
    halflife = halflife_nimg if rampup is None else min(halflife_nimg, cur_nimg * rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


def local(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's piece on this process (the EMA of a sharded generator is sharded alike), else itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class EMA(nn.Module):
    """Holds the averaged copy; ``update`` runs after each optimiser step.

    The ramp-up counts images as EDM's and SiD's training loops do: the EMA update of a step comes before that
    step's images are added to the count, so ``cur_nimg`` is the count *before* the step (0 for the first step,
    whose update therefore copies the weights: β = 0).
    """

    def __init__(self, model: nn.Module, halflife_nimg: float, rampup: float | None = 0.05,
                 shared: frozenset[int] = frozenset(), name: str = "ema"):
        """``shared``: ids of tensors the model shares with the frozen teacher (a LoRA student's base weights): the
        copy shares them too, and only the model's own tensors are averaged."""
        super().__init__()
        self.model = copy.deepcopy(model, memo=sharing_memo(model, shared)).eval().requires_grad_(False)
        self.halflife_nimg, self.rampup, self.shared = halflife_nimg, rampup, shared
        self.name = name                 # several EMAs (sid train): the further ones are ``ema-<half-life>``

    @property
    def main(self) -> bool:
        return self.name == "ema"

    @torch.no_grad()
    def update(self, model: nn.Module, cur_nimg: int, batch: int) -> None:
        beta = ema_beta(batch, cur_nimg, self.halflife_nimg, self.rampup) if self.halflife_nimg > 0 else 0.0
        pairs = [(local(a), local(p.detach())) for a, p in zip(self.model.parameters(), model.parameters())
                 if id(a) not in self.shared]
        if pairs:
            averaged, current = map(list, zip(*pairs))
            torch._foreach_lerp_(averaged, current, 1 - beta)    # p_ema = β p_ema + (1 - β) p, one launch per group
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            if id(b_ema) not in self.shared:
                b_ema.copy_(b)
