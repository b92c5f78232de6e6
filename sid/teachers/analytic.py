"""``teacher.kind=analytic``: exact denoisers of Gaussian mixtures, teachers with a known answer for tests and toys.

An analytic teacher has no weights to copy, so its students (fake score and generator) are EDM-preconditioned
MLPs, first regressed onto the exact denoiser: the analogue of SiD's initialisation from the teacher.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math

import torch
from torch import nn

from sid.config import plain
from sid.networks import MLP
from sid.precond import EDMRule, Preconditioned
from sid.teachers.base import Teacher, on_meta


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


class AnalyticTeacher(Teacher):
    """A Gaussian mixture as a teacher: exact samples, and students fitted to its exact denoiser."""

    exact_samples = True

    def __init__(self, mixture: GaussianMixture, spec: dict, fit_steps: int):
        super().__init__(mixture, mixture.shape, spec)
        self.fit_steps, self._fitted = fit_steps, None

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.denoiser.sample(n, generator).float()

    def make_student(self) -> nn.Module:
        """A copy of the MLP fitted to the exact denoiser: fitted for the first student, copied for the next."""
        if self._fitted is None:
            self._fitted = fitted_student(self.spec, self.denoiser, self.fit_steps)
        return copy.deepcopy(self._fitted).train().requires_grad_(True)


def build(section, trust_code: bool = False) -> AnalyticTeacher:
    """The mixture of ``teacher.analytic``; its students' spec names an MLP of the configured size."""
    mixture = ring_mixture(section.modes, section.radius, section.mode_std, tuple(section.shape), section.seed,
                           plain(section.weights) or None)
    spec = {"kind": "analytic", "shape": list(mixture.shape), "width": section.student_width,
            "depth": section.student_depth, "label_dim": 0, "sigma_data": mixture.sigma_data}
    return AnalyticTeacher(mixture.eval(), spec, section.student_fit_steps)


def architecture(section, trust_code: bool = False) -> AnalyticTeacher:
    """The teacher on the meta device for the memory plan, its students' MLP unfitted: the plan counts sizes, and
    fitting is the one part of building that costs time."""
    teacher = build(section).to("meta")
    teacher._fitted = on_meta(lambda: denoiser_from_spec(teacher.spec))
    return teacher


def denoiser_from_spec(spec: dict, trust_code: bool = False) -> Preconditioned:
    """An analytic run's student architecture: an EDM-preconditioned MLP (random weights)."""
    return Preconditioned(backbone_from_spec(spec), EDMRule(spec["sigma_data"]), label_dim=spec["label_dim"])


def spec_shape(spec: dict) -> tuple[int, ...]:
    """The sample shape the spec's MLP takes."""
    return tuple(spec["shape"])


def backbone_from_spec(spec: dict) -> nn.Module:
    """The MLP alone, e.g. on the meta device to size it before anything is allocated."""
    return MLP(spec["shape"], spec["width"], spec["depth"], spec["label_dim"])


_FITS: dict[str, tuple[nn.Module, torch.Tensor]] = {}     # fitted_student's memo: key -> (fit, RNG state after)


def fitted_student(spec: dict, mixture: GaussianMixture, steps: int) -> nn.Module:
    """``fit_student`` of a fresh student, memoised per process (do not modify the result; copy it).

    The fit is a function of the spec, the mixture, the step count and the global RNG state, so the key holds
    all four; a hit leaves the RNG where the fit would have. A sequential sweep or a resumed run on a toy
    teacher then fits once, and every run draws the same numbers as if it had fitted anew.
    """
    parts = [json.dumps(spec, sort_keys=True), str(steps), repr((mixture.sigma_min, mixture.sigma_max)),
             *(t.cpu().numpy().tobytes().hex() for t in mixture.state_dict().values()),
             torch.get_rng_state().numpy().tobytes().hex()]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()
    if key not in _FITS:
        if len(_FITS) >= 8:
            _FITS.pop(next(iter(_FITS)))
        student = fit_student(denoiser_from_spec(spec), mixture, steps)
        _FITS[key] = (student, torch.get_rng_state())
    student, rng_after = _FITS[key]
    torch.set_rng_state(rng_after)
    return student


def fit_student(student: nn.Module, mixture: GaussianMixture, steps: int, batch: int = 512, lr: float = 2e-3):
    """Regress an MLP denoiser onto the exact one: E λ_EDM(σ) |D_student(x) - D_exact(x)|², ln σ uniform
    on [ln σ_min, ln σ_max].

    The exact target has no sampling noise, so a few hundred steps suffice. Uses the global RNG.
    """
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    lo, hi = math.log(mixture.sigma_min), math.log(mixture.sigma_max)
    for _ in range(steps):
        sigma = torch.empty(batch).uniform_(lo, hi).exp()
        noise = torch.randn(batch, *mixture.shape)
        x = mixture.sample(batch).float() + sigma.view(-1, *[1] * len(mixture.shape)) * noise
        weight = (sigma**2 + student.sigma_data**2) / (sigma * student.sigma_data) ** 2
        err = (student(x, sigma) - mixture(x, sigma)).flatten(1).pow(2).sum(1)
        loss = (weight * err).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student.eval()
