"""σ samplers and grids (T2.5, T8) and the teacher's Heun sampler (second order on Gaussian data)."""

import math

import torch

from sid.ema import EMA, ema_beta
from sid.sampling import euler_sampler, heun_sampler
from sid.schedules import karras_sigma, karras_sigmas, sample_sid_sigma
from sid.teachers.analytic import GaussianMixture


def test_sid_sigma_values_and_range():
    u = torch.tensor([0.0, 0.4, 0.8, 1.0], dtype=torch.float64)
    torch.testing.assert_close(karras_sigma(u, 0.002, 80.0, 7.0),
                               torch.tensor([0.002, 0.965417, 24.408342, 80.0], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.manual_seed(0)
    s = sample_sid_sigma(100_000, 0.8, 0.002, 80.0, 7.0)
    assert s.min() >= 0.002 and s.max() < 24.408342
    assert abs(float((s < 1).float().mean()) - 0.505) < 0.01                 # §2.4: P(σ < 1) ≈ 0.505


def test_karras_grid():
    sigmas = karras_sigmas(18, 0.002, 80.0)
    assert len(sigmas) == 19 and sigmas[0] == 80.0 and abs(sigmas[-2] - 0.002) < 1e-12 and sigmas[-1] == 0
    assert (sigmas.diff() < 0).all()


def test_heun_converges_at_second_order_on_gaussian_data():
    gauss = GaussianMixture([1.0], torch.zeros(1, 1), [0.5])
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    # deterministic ODE: the map is x_T -> s x_T / sqrt(s² + σ_max²), exact for every starting point
    exact = noise * 80 * 0.5 / math.sqrt(0.25 + 80**2)
    errors = [float((heun_sampler(gauss, noise, karras_sigmas(n, 0.002, 80.0)) - exact).abs().max())
              for n in (8, 16, 32)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[2] > 3.0                                       # ≈ 4 for a second-order method
    euler = float((euler_sampler(gauss, noise, karras_sigmas(32, 0.002, 80.0)) - exact).abs().max())
    assert euler > 3 * errors[2]


def test_ema_beta_matches_sid():
    """β = 0.5^(batch / min(halflife, 0.05 cur_nimg)) (§2.4 step 9)."""
    assert ema_beta(256, 1_000_000, 500_000, 0.05) == 0.5 ** (256 / 50_000)
    assert ema_beta(256, 100_000_000, 500_000, 0.05) == 0.5 ** (256 / 500_000)
    assert ema_beta(256, 0, 500_000, 0.05) == 0.5 ** (256 / 1e-8)
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, halflife_nimg=1000, rampup=None)
    with torch.no_grad():
        old = ema.model.weight.clone()
        net.weight.add_(1.0)
    ema.update(net, cur_nimg=10_000, batch=1000)
    torch.testing.assert_close(ema.model.weight, 0.5 * old + 0.5 * net.weight)
