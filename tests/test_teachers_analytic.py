"""teacher.kind=analytic: exact Gaussian-mixture denoisers, and students fitted to them."""

import math

import torch

from sid.config import load_config
from sid.metrics import mode_weights
from sid.teachers import build_teacher
from sid.teachers.analytic import GaussianMixture, ring_mixture


def test_the_mixture_denoiser_is_the_posterior_mean():
    """For one component N(μ, s²) the exact denoiser is μ + s²/(s² + σ²)(x − μ); for a mixture, the responsibility-
    weighted posterior means, here checked against a Monte-Carlo posterior mean in 1-D."""
    single = GaussianMixture([1.0], [[0.7]], [0.4])
    x, sigma = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None], torch.full((7,), 0.9, dtype=torch.float64)
    torch.testing.assert_close(single(x, sigma), 0.7 + 0.16 / (0.16 + 0.81) * (x - 0.7))
    mixture = GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [0.5, 0.8])
    x0 = mixture.sample(2_000_000, torch.Generator().manual_seed(0))
    noisy = x0 + 0.9 * torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    near = (noisy - 0.4).abs() < 0.01                                          # E[x0 | x ≈ 0.4]
    assert near.sum() > 5000 and math.isclose(float(x0[near].mean()), float(mixture(torch.tensor([[0.4]]), 0.9)),
                                              abs_tol=0.03)          # about 4 standard errors


def test_ring_mixtures_and_mode_weights():
    mixture = ring_mixture(modes=4, radius=2.0, std=0.1)
    torch.testing.assert_close(mixture.means.norm(dim=1), torch.full((4,), 2.0, dtype=torch.float64))
    weights = mode_weights(mixture, mixture.sample(4000, torch.Generator().manual_seed(0)))
    assert (weights[:4] - 0.25).abs().max() < 0.03 and weights[4] == 0
    far = torch.zeros(10, 2, dtype=torch.float64)                                 # the centre: near no mode
    assert mode_weights(mixture, far)[4] == 1


def test_analytic_students_are_fitted_to_the_exact_denoiser():
    cfg = load_config([], ["teacher.analytic.modes=3", "teacher.analytic.student_fit_steps=300"])
    teacher = build_teacher(cfg.teacher)
    torch.manual_seed(0)
    student = teacher.make_student()
    sigma = torch.full((2000,), 0.5)
    x = teacher.denoiser.sample(2000).float() + 0.5 * torch.randn(2000, 2)
    err = (student(x, sigma) - teacher.denoiser(x, sigma)).pow(2).sum(1).mean()
    assert err < 0.05 * teacher.denoiser(x, sigma).pow(2).sum(1).mean()


def test_a_repeated_toy_build_reuses_the_fit_and_draws_the_same_numbers(monkeypatch):
    """A second run in the same process (sequential sweep, resume) reuses the student fit: same weights, and the
    global RNG left where a fresh fit leaves it; another seed or mixture fits anew."""
    import sid.teachers.analytic as analytic

    calls = []
    real_fit = analytic.fit_student
    monkeypatch.setattr(analytic, "fit_student", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    monkeypatch.setattr(analytic, "_FITS", {})

    def fit(seed, *overrides):
        cfg = load_config([], ["teacher.analytic.modes=3", "teacher.analytic.student_fit_steps=20", *overrides])
        torch.manual_seed(seed)
        student = build_teacher(cfg.teacher).make_student()
        return torch.cat([p.detach().flatten() for p in student.parameters()]), torch.rand(4)

    fresh = fit(0)
    again = fit(0)
    assert len(calls) == 1
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    assert not torch.equal(fit(1)[0], fresh[0]) and len(calls) == 2
    assert not torch.equal(fit(0, "teacher.analytic.radius=3.0")[0], fresh[0]) and len(calls) == 3
