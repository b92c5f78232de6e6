"""The generator and fake-score losses (sid/losses.py) against the algebra, closed forms and dynamics that
docs/losses.md states: pointwise identities, zero at the optimum, 1-D Gaussian closed forms, a mixture teacher,
gradient-descent dynamics, and the invariants of the generator step."""

import math

import pytest
import torch

from sid.config import LAMBDA_PRESETS, resolve_lam
from sid.errors import SidError
from sid.losses import (
    DistillationLoss,
    edm_loss_weight,
    fake_score_loss,
    flow_matching_loss,
    generator_loss,
    identity_loss,
    sid_weight,
)
from sid.networks import MLP
from sid.precond import EDMRule, FlowRule, Preconditioned
from sid.schedules import karras_sigma
from sid.teachers.analytic import GaussianMixture

LAMS = [0.0, 0.5, 1.0, 1.2, 2.0]


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# Algebra, per sample ---------------------------------------------------------------------------------------

def test_presets_and_free_lambda():
    assert LAMBDA_PRESETS == {"sid": 1.2, "lambda1": 1.0, "fgm": 0.5, "l2": 0.0}
    assert resolve_lam("fgm") == 0.5 and resolve_lam("0.75") == 0.75 and resolve_lam(1.5) == 1.5


@pytest.mark.parametrize("lam", LAMS)
def test_equivalent_form(lam):
    f_phi, f_psi, x_g = rand(4, 3, 5, 5, seed=1), rand(4, 3, 5, 5, seed=2), rand(4, 3, 5, 5, seed=3)
    delta = (f_phi - f_psi).flatten(1)
    other = (delta * (f_psi - x_g).flatten(1)).sum(1) + (1 - lam) * delta.pow(2).sum(1)   # SiD Eq. (23)
    torch.testing.assert_close(identity_loss(f_phi, f_psi, x_g, lam), other, rtol=1e-12, atol=1e-12)


def test_fgm_is_half_difference_of_denoising_losses():
    f_phi, f_psi, x_g = rand(6, 10, seed=1), rand(6, 10, seed=2), rand(6, 10, seed=3)
    half_diff = 0.5 * ((f_phi - x_g).pow(2).sum(1) - (f_psi - x_g).pow(2).sum(1))
    torch.testing.assert_close(identity_loss(f_phi, f_psi, x_g, LAMBDA_PRESETS["fgm"]), half_diff)


@pytest.mark.parametrize("lam", LAMS)
def test_eps_form_is_x0_form_over_sigma_squared(lam):
    """The blog's ε-form <ε_φ - ε_ψ, ε_φ - ε> - λ|ε_φ - ε_ψ|² equals σ⁻² L^x0_λ (EDM) and SNR·L^x0_λ (VP)."""
    f_phi, f_psi, x_g, n = (rand(5, 7, seed=s) for s in range(4))
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0], dtype=torch.float64)[:, None]
    x_t = x_g + sigma * n
    e_phi, e_psi = (x_t - f_phi) / sigma, (x_t - f_psi) / sigma
    eps_form = ((e_phi - e_psi) * (e_phi - n)).sum(1) - lam * (e_phi - e_psi).pow(2).sum(1)
    torch.testing.assert_close(eps_form, identity_loss(f_phi, f_psi, x_g, lam) / sigma[:, 0] ** 2)
    # VP: x_t = ᾱ x_g + β̄ n, ε_• = (x_t - ᾱ f_•) / β̄
    a = 1 / torch.sqrt(1 + sigma**2)
    b = sigma * a
    xt_vp = a * x_g + b * n
    e_phi, e_psi = (xt_vp - a * f_phi) / b, (xt_vp - a * f_psi) / b
    eps_form = ((e_phi - e_psi) * (e_phi - n)).sum(1) - lam * (e_phi - e_psi).pow(2).sum(1)
    torch.testing.assert_close(eps_form, (a / b)[:, 0] ** 2 * identity_loss(f_phi, f_psi, x_g, lam))


def test_mixed_forms_flip_the_sign():
    """The classic sign error: an ε-form first factor with an x0-form second factor has the opposite sign."""
    f_phi, f_psi, x_g = rand(200, 3, seed=1), rand(200, 3, seed=2), rand(200, 3, seed=3)
    mixed = (-(f_phi - f_psi) * (f_phi - x_g)).sum(1)          # (ε_φ - ε_ψ)σ = -(f_φ - f_ψ)
    assert torch.allclose(mixed, -identity_loss(f_phi, f_psi, x_g, 0.0))


def test_official_weight_and_reduction():
    """ω = 1/max(mean|x_g - f_φ|, 1e-5), stop-gradient (SiD's training/sid_loss.py)."""
    x_g = rand(3, 4, seed=1).requires_grad_()
    f_phi = rand(3, 4, seed=2)
    w = sid_weight(x_g, f_phi)
    torch.testing.assert_close(w, 1 / (x_g - f_phi).abs().mean(1).detach())
    assert not w.requires_grad
    same = x_g.detach().clone()
    torch.testing.assert_close(sid_weight(same, same), torch.full((3,), 1e5, dtype=torch.float64))  # clamped


# Zero loss and zero gradient at the optimum, per sample -------------------------------------------------

@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("weighting", ["sid", "x0", "eps"])
def test_zero_at_optimum(lam, weighting):
    """Generator = an exact reparameterised sampler of the teacher's GMM, fake = teacher: L = 0 and ∇L = 0."""
    gmm = GaussianMixture([0.3, 0.7], [[-2.0, 0.5], [1.5, -1.0]], [0.5, 0.8])
    theta = torch.tensor([[-2.0, 0.5, 0.5], [1.5, -1.0, 0.8]], dtype=torch.float64, requires_grad=True)
    k = torch.multinomial(torch.tensor([0.3, 0.7]), 64, replacement=True, generator=torch.Generator().manual_seed(0))
    x_g = theta[k, :2] + theta[k, 2:] * rand(64, 2, seed=5)      # exact samples of the mixture
    sigma = torch.logspace(-2, 1.5, 64, dtype=torch.float64)
    loss = generator_loss(gmm, gmm, x_g, sigma, lam=lam, weighting=weighting)
    assert loss.abs().max() == 0                                   # Δ = f_φ - f_ψ is exactly 0
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    assert grad.abs().max() < 1e-12                                # only the rounding of opposite paths remains


# 1-D Gaussian closed forms (Monte Carlo with common random numbers) -------------------------------------

def expected_gradient_mc(lam, mu, s, mu_g, s_g, sigma, n=400_000, weighting="x0"):
    """E ∂L_λ/∂(μ_g, s_g) with the fake frozen at the exact denoiser of the current generator."""
    teacher, fake = GaussianMixture([1.0], [[mu]], [s]), GaussianMixture([1.0], [[mu_g]], [s_g])
    theta = torch.tensor([mu_g, s_g], dtype=torch.float64, requires_grad=True)
    x_g = theta[0] + theta[1] * rand(n, 1, seed=11)
    torch.manual_seed(12)
    sigmas = torch.full((n,), sigma, dtype=torch.float64)
    loss = generator_loss(teacher, fake, x_g, sigmas, lam=lam, weighting=weighting)
    return torch.autograd.grad(loss.mean(), theta)[0]


def closed_form(lam, mu, s, mu_g, s_g, sigma):
    """The expected gradient for a Gaussian teacher N(μ, s²) and generator N(μ_g, s_g²), fake score exact."""
    a, b = s**2 / (s**2 + sigma**2), s_g**2 / (s_g**2 + sigma**2)
    g_mu = (1 - a) * (mu - mu_g) * ((1 - 2 * lam) * (a - b) - (1 - a))
    g_s = -2 * s_g * (a - b) * ((1 - a) + lam * (a - b))
    return torch.tensor([g_mu, g_s], dtype=torch.float64)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.2])
@pytest.mark.parametrize("mu_g,s_g,sigma", [(1.0, 0.5, 0.7), (-0.5, 2.0, 0.7), (0.8, 1.5, 2.0)])
def test_expected_gradient_matches_closed_form(lam, mu_g, s_g, sigma):
    mc = expected_gradient_mc(lam, 0.3, 0.8, mu_g, s_g, sigma)
    exact = closed_form(lam, 0.3, 0.8, mu_g, s_g, sigma)
    assert torch.allclose(mc, exact, rtol=0.03, atol=3e-3), (mc, exact)


def objective(mu, s, mu_g, s_g, sigma):
    """J = E (D_φ - D_ψ*)² under x_t ~ N(μ_g, s_g² + σ²), in closed form."""
    return sigma**4 * ((mu - mu_g) ** 2 * (s_g**2 + sigma**2) + (s**2 - s_g**2) ** 2) / (
        (s**2 + sigma**2) ** 2 * (s_g**2 + sigma**2))


def test_special_values():
    """λ = ½ is exactly ½∇J (FGM); at s_g = s the μ-gradient is the same for every λ; (μ, s) is stationary."""
    mu, s, mu_g, s_g, sigma = 0.3, 0.8, -0.4, 1.7, 0.9
    theta = torch.tensor([mu_g, s_g], dtype=torch.float64, requires_grad=True)
    (grad_j,) = torch.autograd.grad(objective(mu, s, theta[0], theta[1], sigma), theta)
    torch.testing.assert_close(closed_form(0.5, mu, s, mu_g, s_g, sigma), grad_j / 2)
    same = [closed_form(lam, mu, s, mu_g, s, sigma)[0] for lam in LAMS]
    torch.testing.assert_close(torch.stack(same), same[0].expand(len(LAMS)))
    for lam in LAMS:
        assert closed_form(lam, mu, s, mu, s, sigma).abs().max() == 0


def test_sid_weight_keeps_the_fixed_point():
    """ω rescales per sample but cannot move the stationary point (μ_g, s_g) = (μ, s)."""
    g = expected_gradient_mc(1.2, 0.3, 0.8, 0.3, 0.8, 0.7, n=20_000, weighting="sid")
    assert g.abs().max() < 1e-12


# Dynamics: plain gradient descent on θ = (μ_g, s_g) with our loss's gradient ---------

def gaussian_denoiser(mu, s):
    """D(x; σ) = μ + s²/(s² + σ²)(x − μ), the exact denoiser of N(μ, s²), on rows x [B, N] with σ [B]."""
    def denoise(x, sigma, labels=None):
        return mu + s**2 / (s**2 + sigma[:, None] ** 2) * (x - mu)
    return denoise


def descend(cases, steps=1000, lr=0.05, n=1024, plug_in=False):
    """Gradient descent (lr 0.05) for each case (λ, start (μ_g, s_g), σ values) towards the teacher
    N(0, 1), with the fake frozen at the exact denoiser of the current generator. The gradient is autograd's
    through ``generator_loss`` (x0 weighting), averaged over the case's σ values and 2n fixed samples (common
    random numbers, antithetic and rescaled: z's mean is exactly 0 and its mean square 1); ``plug_in``: of
    L_0 - L_1, whose expected gradient is the path channel P alone (docs/losses.md). All cases descend together, one
    row per (case, σ)."""
    theta = torch.tensor([start for _, start, _ in cases], dtype=torch.float64)    # [C, 2]
    rows = [(i, lam, sigma, 1 / len(sigmas)) for i, (lam, _, sigmas) in enumerate(cases) for sigma in sigmas]
    case, lam, sigma, weight = (torch.tensor(column, dtype=torch.float64) for column in zip(*rows))
    z = torch.cat([rand(1, n, seed=5), -rand(1, n, seed=5)], dim=1)
    z = z / z.pow(2).mean().sqrt()                                                  # mean 0, mean square 1
    teacher = gaussian_denoiser(0.0, 1.0)
    for _ in range(steps):
        leaf = theta.clone().requires_grad_(True)
        mu_g, s_g = leaf[case.long()].split(1, dim=1)                               # [rows, 1] each
        fake = gaussian_denoiser(mu_g.detach(), s_g.detach())
        x_g = mu_g + s_g * z
        torch.manual_seed(6)
        loss = generator_loss(teacher, fake, x_g, sigma, lam=0.0 if plug_in else lam[:, None], weighting="x0")
        if plug_in:
            torch.manual_seed(6)
            loss = loss - generator_loss(teacher, fake, x_g, sigma, lam=1.0, weighting="x0")
        (grad,) = torch.autograd.grad((loss * weight).sum() / (2 * n), leaf)
        theta -= lr * grad
    return theta


def converged(theta):
    return bool(((theta - torch.tensor([0.0, 1.0], dtype=theta.dtype)).abs() < 0.05).all())


def test_gradient_descent_converges_diverges_and_collapses_as_predicted():
    """Gradient descent on a Gaussian toy at σ = 1, then on SiD's σ grid. λ ∈ [½, 1] and λ = 0 converge from
    either side; λ = 1.2 converges below its repelling root s_g = √11 ≈ 3.317 and diverges (s_g → ∞) above it;
    on the σ grid λ = 1.2 converges from s_g = 8 and diverges from 30; the plug-in channel alone collapses the
    generator (s_g → 0) while its mean runs away. 1000 steps, after which descent on the exact expected
    gradients (``closed_form``) is at s_g = 1.0135 from 8 and 78,404 from 30 on the grid, 117 from 3.5 at σ = 1
    (measured here: 1.0135, 79,595 and 110); λ = 1 from s_g = 30 is still at 28.3 then (its s-gradient fades as
    1/s_g), so that start is checked for direction only."""
    grid = karras_sigma(torch.linspace(0, 0.8, 41, dtype=torch.float64), 0.002, 80.0, 7.0).tolist()
    converging = [(lam, start, [1.0]) for lam in (0.5, 1.0, 1.2, 0.0) for start in ([2.0, 0.5], [2.0, 3.0])]
    converging += [(1.2, [0.0, 3.2], [1.0]), (0.5, [0.0, 3.5], [1.0]), (1.0, [0.0, 3.5], [1.0]),
                   (0.5, [0.0, 30.0], [1.0])]
    final = descend(converging + [(1.2, [0.0, 3.5], [1.0]), (1.0, [0.0, 30.0], [1.0])])
    assert all(converged(theta) for theta in final[:-2]), list(zip(converging, final))
    assert final[-2, 1] > 10 and 1 < final[-1, 1] < 29.5, final[-2:]          # diverged; slowly converging
    from_8, from_30 = descend([(1.2, [0.0, 8.0], grid), (1.2, [0.0, 30.0], grid)], n=128)   # 41 σ rows each
    assert converged(from_8) and from_30[1] > 1000, (from_8, from_30)
    (collapsed,) = descend([(0.0, [2.0, 0.5], [1.0])], n=128, plug_in=True)
    assert collapsed[1].abs() < 0.05 and collapsed[0] > 100, collapsed


# A mixture teacher, Gaussian generator: 2 E∇L_½ = ∇J ----------------------------------------------------------

def test_fgm_gradient_is_half_the_true_gradient_on_a_mixture():
    """J(θ) = E_{x_t ~ p_θ,σ} |D_φ - D_ψ*(θ)|² by quadrature, its θ-gradient by finite differences."""
    teacher = GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [0.5, 0.8])
    mu_g, s_g, sigma = 0.5, 2.0, 0.7
    grid = torch.linspace(-14, 14, 20001, dtype=torch.float64)[:, None]

    def J(m, s):
        var = s**2 + sigma**2
        density = torch.exp(-(grid[:, 0] - m) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)
        d_fake = m + s**2 / var * (grid[:, 0] - m)
        d_teacher = teacher(grid, torch.full((len(grid),), sigma, dtype=torch.float64))[:, 0]
        return float(((d_teacher - d_fake) ** 2 * density).sum() * (grid[1, 0] - grid[0, 0]))

    h = 1e-4
    grad_j = torch.tensor([(J(mu_g + h, s_g) - J(mu_g - h, s_g)) / (2 * h),
                           (J(mu_g, s_g + h) - J(mu_g, s_g - h)) / (2 * h)], dtype=torch.float64)
    fake = GaussianMixture([1.0], [[mu_g]], [s_g])
    theta = torch.tensor([mu_g, s_g], dtype=torch.float64, requires_grad=True)
    n = 1_000_000
    x_g = theta[0] + theta[1] * rand(n, 1, seed=21)
    torch.manual_seed(22)
    loss = generator_loss(teacher, fake, x_g, torch.full((n,), sigma, dtype=torch.float64), lam=0.5, weighting="x0")
    (grad_l,) = torch.autograd.grad(loss.mean(), theta)
    assert torch.allclose(2 * grad_l, grad_j, rtol=0.02, atol=0.01 * grad_j.norm()), (2 * grad_l, grad_j)


# Invariants of the generator step ------------------------------------------------------------------------------

def mlp_denoiser(seed):
    torch.manual_seed(seed)
    return Preconditioned(MLP((3,), width=16, depth=2), EDMRule(0.5))


def test_no_gradient_reaches_teacher_or_fake_parameters_and_both_take_part():
    """Parameters of f_φ and f_ψ get no gradient; cutting the input-gradient of either changes G's update."""
    teacher = mlp_denoiser(0).requires_grad_(False)
    fake = mlp_denoiser(1).requires_grad_(False)
    generator = mlp_denoiser(2)
    z, sigma = torch.randn(32, 3), torch.full((32,), 0.8)

    def g_grad(teacher_net, fake_net):
        generator.zero_grad()
        torch.manual_seed(3)
        generator_loss(teacher_net, fake_net, generator(2.5 * z, 2.5), sigma, lam=1.2).sum().backward()
        return torch.cat([p.grad.flatten() for p in generator.parameters()])

    class NoInputGrad(torch.nn.Module):  # the same predictions, with the input-gradient cut
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, s, labels=None):
            return self.net(x.detach(), s, labels)

    full = g_grad(teacher, fake)
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in fake.parameters())
    torch.testing.assert_close(full, g_grad(teacher, fake))          # deterministic given the seed
    assert not torch.allclose(full, g_grad(teacher, NoInputGrad(fake)))   # f_ψ's input-gradient takes part
    assert not torch.allclose(full, g_grad(NoInputGrad(teacher), fake))   # f_φ's input-gradient takes part


def test_fake_score_loss_is_the_weighted_denoising_error():
    gmm = GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    x_g, sigma = torch.zeros(4, 2), torch.tensor([0.5, 1.0, 2.0, 4.0])
    torch.manual_seed(0)
    loss = fake_score_loss(gmm, x_g, sigma, sigma_data=0.5)
    torch.manual_seed(0)
    n = torch.randn_like(x_g)
    x_t = sigma[:, None] * n
    expected = edm_loss_weight(sigma, 0.5) * (gmm(x_t, sigma) - x_g).pow(2).sum(1)
    torch.testing.assert_close(loss, expected)


def test_flow_matching_loss_is_the_velocity_error_of_rectified_flow():
    """Written in flow terms (x_t = (1 - t) x0 + t ε, v = ε - x0, the network fed 1000 t) for a random network,
    ‖F - v‖² equals the loss computed through the EDM-units denoiser."""
    net = MLP((2,), width=16, depth=2)
    x0, sigma = rand(6, 2, seed=4).float(), torch.tensor([0.01, 0.3, 1.0, 2.5, 9.0, 70.0])
    torch.manual_seed(0)
    loss = flow_matching_loss(Preconditioned(net, FlowRule()), x0, sigma)
    torch.manual_seed(0)
    eps = torch.randn_like(x0)                                   # the noise the loss draws
    t = (sigma / (1 + sigma))[:, None]
    x_t = (1 - t) * x0 + t * eps
    expected = (net(x_t, 1000 * t.flatten()) - (eps - x0)).pow(2).sum(1)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


# The loss object: constants bound once from the config ----------------------------------------------------------

def test_the_loss_object_binds_the_config_and_computes_the_pure_losses():
    """λ parsed from its name, the generator's σ range from the teacher unless set, the scales over the
    per-process batch (SiD's reduction); each method draws its σ and calls the pure loss with them."""
    from sid.config import load_config
    from sid.teachers import Teacher

    gmm = GaussianMixture([0.3, 0.7], [[-2.0, 0.5], [1.5, -1.0]], [0.5, 0.8], sigma_min=0.01, sigma_max=40.0)
    cfg = load_config([], ["loss.lam=fgm", "loss.weighting=eps", "loss.t_max=0.6", "loss.g_scale=50"])
    teacher = Teacher(gmm, (2,), {"kind": "analytic"})
    loss = DistillationLoss.from_config(cfg.loss, teacher, per_process=8)
    assert (loss.lam, loss.weighting, loss.sigma_min, loss.sigma_max) == (0.5, "eps", 0.01, 40.0)
    assert loss.g_scale == 50 / 8 and loss.fake_scale == 1 / 8 and loss.sigma_data == gmm.sigma_data
    pinned = DistillationLoss.from_config(load_config([], ["loss.sigma_min=0.1", "loss.sigma_max=5"]).loss, teacher, 8)
    assert (pinned.sigma_min, pinned.sigma_max, pinned.lam) == (0.1, 5.0, 1.2)

    fake = GaussianMixture([1.0], [[0.0, 0.0]], [1.5])
    x_g = rand(8, 2, seed=7)
    torch.manual_seed(3)
    got = loss.generator(gmm, fake, x_g)
    torch.manual_seed(3)
    sigma = karras_sigma(torch.rand(8) * 0.6, 0.01, 40.0, 7.0)                      # the draw the method makes
    torch.testing.assert_close(got, generator_loss(gmm, fake, x_g, sigma, lam=0.5, weighting="eps") * 50 / 8)
    torch.manual_seed(4)
    got = loss.fake_score(fake, x_g)
    torch.manual_seed(4)
    sigma = (torch.randn(8) * 1.2 - 1.2).exp()
    torch.testing.assert_close(got, fake_score_loss(fake, x_g, sigma, sigma_data=gmm.sigma_data) / 8)


def test_the_velocity_weighting_at_half_is_fgms_velocity_loss():
    """weighting=velocity (2/t²): at λ = ½ the per-sample loss is FGM's L1 + L2 = ‖u_φ − u_c‖² − ‖u_ψ − u_c‖² in a
    flow teacher's own velocity units (u = (x_t − D)/t, u_c = ε − x0 at x_t = (1 − t) x0 + t ε; sid-math §3.5);
    one_minus_t is SiD-DiT's 1 − t."""
    from sid.losses import loss_weight

    x_g, eps, sigma = rand(5, 6, seed=1), rand(5, 6, seed=2), torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0])
    f_phi, f_psi = rand(5, 6, seed=3), rand(5, 6, seed=4)
    t = (sigma / (1 + sigma))[:, None]
    x_t = (1 - t) * x_g + t * eps
    u_c = eps - x_g
    fgm = (((x_t - f_phi) / t - u_c) ** 2).sum(1) - (((x_t - f_psi) / t - u_c) ** 2).sum(1)
    ours = loss_weight("velocity", sigma, x_g, f_phi) * identity_loss(f_phi, f_psi, x_g, 0.5)
    torch.testing.assert_close(ours, fgm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_weight("one_minus_t", sigma, x_g, f_phi), 1 - t.flatten())


def test_the_teachers_own_timesteps_and_their_range():
    """time=timesteps draws only σ_k with k in loss.timesteps (both ends), as torch.randint(20, 980) does."""
    from sid.schedules import sample_timestep_sigma

    sigmas = torch.linspace(0.01, 15.0, 1000)
    torch.manual_seed(0)
    drawn = sample_timestep_sigma(50_000, sigmas, 20, 979)
    k = torch.searchsorted(sigmas, drawn)
    assert torch.equal(sigmas[k], drawn) and k.min() == 20 and k.max() == 979
    assert abs(k.float().mean().item() - 499.5) < 3


def test_native_time_on_a_teacher_without_it_is_one_line():
    from sid.config import load_config
    from sid.losses import DistillationLoss
    from sid.run import initial_sigma
    from sid.teachers.base import Teacher

    teacher = Teacher(Preconditioned(torch.nn.Identity(), EDMRule(0.5, 0.002, 80.0)), (1, 4, 4), {"kind": "python"})
    cfg = load_config([], ["loss.time=timesteps"])
    with pytest.raises(SidError, match="loss.time=timesteps needs a teacher with discrete timesteps.*continuous"):
        DistillationLoss.from_config(cfg.loss, teacher, per_process=4)
    with pytest.raises(SidError, match="generator.t_init=625: this python teacher has continuous time"):
        initial_sigma(load_config([], ["generator.t_init=625"]).generator, teacher)
    from sid.teachers.diffusers.rules import DiscreteVPRule

    discrete = Teacher(Preconditioned(torch.nn.Identity(), DiscreteVPRule(torch.linspace(0.999, 0.01, 100),
                                                                          "epsilon")), (1, 4, 4), {"kind": "diffusers"})
    with pytest.raises(SidError, match=r"loss.timesteps=\[20, 979\] goes past the teacher's 100 timesteps"):
        DistillationLoss.from_config(cfg.loss, discrete, per_process=4)
    with pytest.raises(SidError, match="generator.t_init=625: this diffusers teacher has timesteps 0..99"):
        initial_sigma(load_config([], ["generator.t_init=625"]).generator, discrete)
    native = DistillationLoss.from_config(load_config([], ["loss.fake_loss=native"]).loss, discrete, per_process=4)
    torch.testing.assert_close(native.fake_weight(torch.tensor([0.5, 2.0])), torch.tensor([4.0, 0.25]))
