"""The denoiser contract ``D(x, sigma, labels) -> x0_hat`` and the coefficient rules that make a raw network one.

Every rule writes a parameterisation as ``D(x; σ) = c_skip x + c_out F(c_in x, c_noise)`` in EDM units
(``x = x0 + σ n``; Karras et al. 2022, Eq. 7 and Table 1). The continuous rules live here, since any network
may use them (``Preconditioned(net, EDMRule(0.5))``); rules tied to a model library's own schedule, such as
diffusers' discrete ones, live with their adapter in ``sid/teachers/``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.utils.checkpoint
from torch import nn

from sid.errors import SidError


class Denoiser(Protocol):
    """Every network the trainer touches: ``x = x0 + sigma * n`` in, ``E[x0 | x]`` out (EDM units, float32)."""

    sigma_min: float
    sigma_max: float
    sigma_data: float
    label_dim: int                      # 0: unconditional; else one-hot class labels of this size

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...


class Coefficients(NamedTuple):
    """``D(x; sigma) = c_skip * x + c_out * F(c_in * x, c_noise)``."""

    c_skip: torch.Tensor                # each [B, 1, ..., 1]
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor               # what the raw network is fed as its time input


class Rule(nn.Module):
    """A coefficient rule: σ -> ``Coefficients``, with the σ range its network was trained on and σ_data."""

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def training_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) such that λ(σ) Σ_j (D(x0 + σn) − x0)_j² is the loss this parameterisation's networks are trained
        with, in their own units (``loss.fake_loss=native``). EDM's λ_EDM here; each rule says its own."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def timestep_sigmas(self) -> torch.Tensor | None:
        """σ of each of the network's own training timesteps, for discrete schedules (else None)."""
        return None


class EDMRule(Rule):
    """EDM preconditioning (Karras et al. 2022, Table 1): networks trained the EDM way."""

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        total = sigma**2 + self.sigma_data**2
        return Coefficients(c_skip=self.sigma_data**2 / total, c_out=sigma * self.sigma_data / total.sqrt(),
                            c_in=1 / total.sqrt(), c_noise=sigma.log() / 4)


class ContinuousVPRule(Rule):
    """Continuous-time VP (Song et al. 2021; EDM's VPPrecond): c_skip = 1, c_out = -σ, c_in = 1/sqrt(σ² + 1),
    c_noise = (M - 1) t(σ) with t(σ) = (sqrt(β_min² + 2 β_d ln(1 + σ²)) - β_min) / β_d (Karras et al. 2022,
    Table 1)."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, **settings):
        super().__init__(**settings)
        self.beta_d, self.beta_min, self.M = beta_d, beta_min, M

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        t = ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d
        return Coefficients(torch.ones_like(sigma), -sigma, (1 + sigma**2).rsqrt(), (self.M - 1) * t)

    def training_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """1/σ²: ε-MSE (EDM's VPLoss)."""
        return sigma**-2


class VERule(Rule):
    """VE (Song et al. 2021; EDM's VEPrecond): c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ / 2)."""

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        return Coefficients(torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log())

    def training_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """1/σ² (EDM's VELoss)."""
        return sigma**-2


class FlowRule(Rule):
    """Rectified flow / flow matching: ``x_t = (1 - t) x0 + t ε`` with the network predicting ``v = ε - x0``
    (SD3, FLUX). In EDM units ``σ = t / (1 - t)``, ``x_t = x / (1 + σ)`` and ``D = x_t - t v̂``; the network is
    fed ``t`` times its own timestep scale (diffusers' flow-matching schedulers: ``num_train_timesteps``). A
    sampling "shift" only re-spaces a schedule and is not applied here."""

    def __init__(self, timestep_scale: float = 1000.0, **settings):
        super().__init__(**settings)
        self.timestep_scale = timestep_scale

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        """At σ = ∞ (t = 1) the denoiser is given the noise z itself, x / σ: ``pure_noise``'s coefficients, chosen
        per sample without a host sync."""
        t = sigma / (1 + sigma)
        c = Coefficients(c_skip=1 - t, c_out=-t, c_in=1 - t, c_noise=t * self.timestep_scale)
        limit = self.pure_noise(torch.ones_like(sigma))
        return Coefficients(*(torch.where(sigma.isinf(), a, b) for a, b in zip(limit, c)))

    def training_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """1/t²: velocity MSE, since v̂ − v = (x0 − D) / t (SD3's and SiD-DiT's unweighted flow matching)."""
        return ((1 + sigma) / sigma) ** 2

    def pure_noise(self, ones: torch.Tensor) -> Coefficients:
        """The coefficients of ``D(σ z; σ)`` in z (not x = σ z) as σ → ∞ (``ones``: [B, 1, ..., 1] to shape them),
        which only flows have. t = 1: x_t = (1 − t) σ z = t z = z, so D = z − v(z; 1) (SiD-DiT's generator at
        init_timestep 999)."""
        return Coefficients(c_skip=ones, c_out=-ones, c_in=ones, c_noise=ones * self.timestep_scale)


def broadcast_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-sample sigma ([], [B] or [B, 1, ...]) as [B, 1, ..., 1] in x's dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *[1] * (x.ndim - 1)).expand(x.shape[0], *[1] * (x.ndim - 1))


class Preconditioned(nn.Module):
    """A raw network ``F(x_in, c_noise, labels)`` made a denoiser by a coefficient ``rule``.

    Owns the precision boundary: x, sigma and the output are float32 (float64 stays float64), the
    coefficients are computed in that precision, and only the backbone runs under the caller's autocast.
    """

    def __init__(self, net: nn.Module, rule: Rule, label_dim: int = 0):
        super().__init__()
        self.net, self.rule, self.label_dim = net, rule, label_dim
        self.grad_checkpointing = False  # recompute the backbone's activations in backward (perf.grad_checkpointing)
        self.register_load_state_dict_pre_hook(_renamed_rule)

    sigma_min = property(lambda self: self.rule.sigma_min)
    sigma_max = property(lambda self: self.rule.sigma_max)
    sigma_data = property(lambda self: self.rule.sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``augment_labels``: for backbones conditioned on how their input was augmented (EDM's CIFAR-10
        networks; the fake-score step with ``loss.augment``), passed on only when given."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        c = self.rule(broadcast_sigma(sigma, x))
        inputs = (c.c_in * x, c.c_noise.flatten(), labels)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        if self.grad_checkpointing and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(self.net, *inputs, use_reentrant=False, **extra)
        else:
            out = self.net(*inputs, **extra)
        return c.c_skip * x + c.c_out * out.to(x.dtype)


def from_noise(denoiser, z: torch.Tensor, sigma: float, labels=None) -> torch.Tensor:
    """``D(σ z; σ, labels)``: the denoiser at noise z scaled to the level σ (a generator's step). σ = ∞ is pure
    noise, defined where the denoiser's rule has that limit (flows: t = 1): the denoiser is given z itself."""
    if math.isinf(sigma):
        check_pure_noise(denoiser)
    return denoiser(z if math.isinf(sigma) else sigma * z, torch.full((len(z),), sigma, device=z.device), labels)


def check_pure_noise(denoiser) -> None:
    """One line where ``from_noise`` at σ = ∞ has no meaning for this denoiser: its rule has no such limit."""
    if getattr(getattr(denoiser, "rule", None), "pure_noise", None) is None:
        rule = type(getattr(denoiser, "rule", denoiser)).__name__
        raise SidError(f"generator.sigma_init=inf (pure noise, t = 1) has a limit only for flow teachers; this "
                       f"teacher's {rule} has none: give a finite generator.sigma_init")


def _renamed_rule(module, state_dict, prefix, *args) -> None:
    """States saved before the rule was called ``rule`` keep its buffers under ``precond.``: read them as its."""
    old = prefix + "precond."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "rule." + key[len(old):]] = state_dict.pop(key)
