"""Teacher adapters: any pretrained model -> the denoiser contract, plus how to build its students.

A ``Teacher`` bundles the frozen denoiser f_φ, the sample shape, and a ``spec``: a JSON-able description
of the *student* architecture, from which exported generators are rebuilt without the training code.
Network teachers are their own students (the fake score and generator start as copies of them); an
analytic teacher has no weights, so its students are fresh EDM-preconditioned MLPs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from sid.config import plain
from sid.errors import SidError
from sid.networks import MLP
from sid.precond import EDMPrecond, Preconditioned
from sid.teachers.analytic import GaussianMixture, ring_mixture

TEACHER_KINDS = ("analytic", "diffusers", "edm_pickle", "python")


@dataclass
class Teacher:
    denoiser: nn.Module                 # f_φ, frozen, in eval mode
    shape: tuple[int, ...]              # one sample's shape
    spec: dict                          # rebuilds the students' architecture (JSON)

    fit_steps: int = 0                  # analytic teachers: regression steps that fit the MLP student
    _fitted: nn.Module | None = None

    @property
    def label_dim(self) -> int:
        return self.denoiser.label_dim

    def make_student(self) -> nn.Module:
        """A trainable denoiser that starts as the teacher: a copy of a network teacher, or, for an analytic
        teacher, an MLP fitted to its exact denoiser (once; later students are copies of that fit)."""
        if self.spec["kind"] == "mlp" and self._fitted is None:
            self._fitted = fitted_student(self.spec, self.denoiser, self.fit_steps)
        source = self._fitted if self._fitted is not None else self.denoiser
        return copy.deepcopy(source).train().requires_grad_(True)


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


def denoiser_from_spec(spec: dict, trust_code: bool = False) -> nn.Module:
    """Rebuild a student architecture (random weights) from its spec; ``trust_code``: a spec may name the
    user's Python function that builds it (``teacher.kind=python``), run only when trusted."""
    if spec["kind"] == "mlp":
        net = MLP(spec["shape"], spec["width"], spec["depth"], spec["label_dim"])
        return Preconditioned(net, EDMPrecond(spec["sigma_data"]), label_dim=spec["label_dim"])
    if spec["kind"] == "diffusers":
        from sid.teachers.diffusers_unet import denoiser_from_spec as diffusers_from_spec

        return diffusers_from_spec(spec)
    if spec["kind"] == "edm_pickle":
        from sid.teachers.edm_pickle import denoiser_from_spec as edm_from_spec

        return edm_from_spec(spec)
    if spec["kind"] == "python":
        from sid.teachers.python import denoiser_from_spec as python_from_spec

        return python_from_spec(spec, trust_code)
    raise SidError(f"unknown denoiser kind {spec['kind']!r} in an exported config; it was written by another tool")


def build_teacher(cfg) -> Teacher:
    """The teacher named by the ``teacher`` section of the config; a network teacher's weights must be finite."""
    teacher = _build_teacher(cfg)
    state = teacher.denoiser.state_dict()
    bad = [name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise SidError(f"the teacher's weights hold NaN or inf ({len(bad)} of {len(state)} tensors, e.g. {bad[0]}): "
                       "its file is damaged or comes from a diverged run; give another checkpoint")
    return teacher


def _build_teacher(cfg) -> Teacher:
    if cfg.kind == "analytic":
        a = cfg.analytic
        mixture = ring_mixture(a.modes, a.radius, a.mode_std, tuple(a.shape), a.seed, plain(a.weights) or None)
        spec = {"kind": "mlp", "shape": list(mixture.shape), "width": a.student_width,
                "depth": a.student_depth, "label_dim": 0, "sigma_data": mixture.sigma_data}
        return Teacher(mixture.eval(), mixture.shape, spec, fit_steps=a.student_fit_steps)
    if cfg.kind == "diffusers":
        from sid.teachers.diffusers_unet import load_diffusers_denoiser

        d = cfg.diffusers
        unet_config = plain(d.unet_config) if d.unet_config else None
        denoiser, spec = load_diffusers_denoiser(d.path, unet_config, d.prediction_type, d.sigma_data)
        unet_cfg = denoiser.net.unet.config
        size = unet_cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return Teacher(denoiser.eval().requires_grad_(False), (unet_cfg.in_channels, *size), spec)
    if cfg.kind == "edm_pickle":
        from sid.teachers.edm_pickle import load_edm_denoiser

        denoiser, shape, spec = load_edm_denoiser(cfg.edm_pickle.path, cfg.edm_pickle.trust, cfg.edm_pickle.sigma_data)
        return Teacher(denoiser.eval().requires_grad_(False), shape, spec)
    if cfg.kind == "python":
        from sid.teachers.python import load_python_denoiser

        p = cfg.python
        denoiser, spec = load_python_denoiser(p.factory, plain(p.kwargs), plain(p.shape))
        return Teacher(denoiser.eval().requires_grad_(False), tuple(spec["shape"]), spec)
    raise SidError(f"teacher.kind={cfg.kind!r} is unknown; choose one of {TEACHER_KINDS}")


__all__ = ["Teacher", "build_teacher", "denoiser_from_spec", "GaussianMixture", "ring_mixture", "TEACHER_KINDS"]
