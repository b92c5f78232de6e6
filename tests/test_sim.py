"""SIM (loss.kind=sim): its generator loss has the gradient of the pseudo-Huber score divergence, proved on Gaussians
whose scores are exact, and reduces to SiD's λ = 1 as c → ∞.

SIM's score-gradient theorem (Luo et al. 2024, §3.2) is about the divergence with the sampling distribution held
fixed, J(θ) = c σ⁴ E_{x ~ sg p_θ,σ} d(s_θ(x) − s_q(x)), d(y) = √(‖y‖² + c²) − c: its gradient reaches θ through the
generator's score alone. The test computes that gradient by autograd from the closed-form Gaussian scores, and the
loss's gradient through x_g = m + e^ℓ z with the exact denoisers of both distributions as teacher and fake score
(parameters frozen, inputs differentiable). Both are Monte-Carlo estimates of one vector: over K independent
batches each gives a mean and a standard error, and they must agree within 5 joint standard errors (a chance of
about 6e-7 per coordinate for a correct loss), while each coordinate is at least 10 standard errors from zero.
"""

import math

import pytest
import torch

from sid.config import load_config
from sid.errors import SidError
from sid.losses import generator_loss, sim_loss

F64 = torch.float64
MU, VAR_Q = torch.tensor([1.0, -0.5, 0.3], dtype=F64), 0.25


def gaussian_denoiser(mean, var):
    """The exact denoiser of N(mean, var I) at noise σ: mean + var / (var + σ²) (x − mean)."""
    def denoise(x, sigma, labels=None):
        s2 = sigma.reshape(-1, 1) ** 2
        return mean + var / (var + s2) * (x - mean)
    return denoise


def estimates(c, sigma0, batches=20, n=10_000):
    """Per batch: the SIM loss's gradient and the divergence's, w.r.t. (m, ℓ) of the generator N(m, e^{2ℓ} I)."""
    m = torch.zeros(3, dtype=F64, requires_grad=True)
    log_s = torch.tensor(0.0, dtype=F64, requires_grad=True)
    teacher = gaussian_denoiser(MU, VAR_Q)
    fake = gaussian_denoiser(m.detach(), math.exp(2 * log_s.item()))       # the generator's own, parameters frozen
    sigma = torch.full((n,), sigma0, dtype=F64)
    ours, truth = [], []
    for b in range(batches):
        torch.manual_seed(b)
        x_g = m + log_s.exp() * torch.randn(n, 3, dtype=F64)
        loss = sim_loss(teacher, fake, x_g, sigma, c=c, weighting="x0").mean()
        ours.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, (m, log_s))]))

        var = (2 * log_s).exp()
        x = (m.detach() + math.sqrt(var.item() + sigma0**2) * torch.randn(n, 3, dtype=F64))   # from sg p_θ,σ
        y = -(x - m) / (var + sigma0**2) + (x - MU) / (VAR_Q + sigma0**2)                    # s_θ − s_q
        divergence = c * sigma0**4 * ((y.pow(2).sum(1) + c**2).sqrt() - c).mean()
        truth.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(divergence, (m, log_s))]))
    return torch.stack(ours), torch.stack(truth)


@pytest.mark.parametrize("c, sigma0", [(0.5, 1.0), (2.0, 0.5)])
def test_the_sim_loss_has_the_gradient_of_the_pseudo_huber_score_divergence(c, sigma0):
    ours, truth = estimates(c, sigma0)
    k = len(ours)
    se = ((ours.var(0) + truth.var(0)) / k).sqrt()
    assert ((ours.mean(0) - truth.mean(0)).abs() < 5 * se).all()
    assert (truth.mean(0).abs() > 10 * truth.std(0) / math.sqrt(k)).all()


def test_as_c_grows_sim_is_sid_at_lambda_one():
    """c → ∞: d(y) → ‖y‖²/2c, and w c σ⁴ times SIM's loss → SiD's w L_1, value and gradient (relative error
    ‖Δ‖² / 2c²σ⁴ ≈ 1e-17 here; 1e-10 leaves room for float64 rounding)."""
    teacher, fake = gaussian_denoiser(MU, VAR_Q), gaussian_denoiser(torch.zeros(3, dtype=F64), 2.0)
    sigma = torch.tensor([0.3, 1.0, 4.0, 20.0], dtype=F64)
    x_sim, x_sid = (torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
                    for _ in range(2))
    torch.manual_seed(2)
    sim = sim_loss(teacher, fake, x_sim, sigma, c=1e8, weighting="sid")
    torch.manual_seed(2)
    sid = generator_loss(teacher, fake, x_sid, sigma, lam=1.0, weighting="sid")
    torch.testing.assert_close(sim, sid, rtol=1e-10, atol=0)
    (g_sim,), (g_sid,) = torch.autograd.grad(sim.sum(), x_sim), torch.autograd.grad(sid.sum(), x_sid)
    torch.testing.assert_close(g_sim, g_sid, rtol=1e-10, atol=1e-14)


def test_sim_refuses_a_lambda_and_trains(tmp_path, capsys):
    from sid.trainer import train

    with pytest.raises(SidError, match="^loss.lam=1.2 has no meaning for loss.kind=sim"):
        load_config([], ["loss.kind=sim", "loss.lam=1.2"])
    with pytest.raises(SidError, match="loss.sim_c=0.0 is out of range"):
        load_config([], ["loss.kind=sim", "loss.sim_c=0"])
    run = train(load_config([], ["loss.kind=sim", "optim.batch=16", "train.total_nimg=32",
                                 "teacher.analytic.student_width=16", "teacher.analytic.student_fit_steps=10",
                                 "train.log_every_nimg=32", "train.sample_every_nimg=100000",
                                 "train.ckpt_every_nimg=32", f"train.run_dir={tmp_path / 'run'}",
                                 "train.progress=false", "train.tracker=none"]))
    assert "SIM (pseudo-Huber c = 1)" in capsys.readouterr().out
    assert int(next(iter(run.opt_g.state.values()))["step"]) == 2
    assert all(p.isfinite().all() for p in run.generator.parameters())
