"""The teacher samplers (sid/sampling.py): Heun is second order on Gaussian data, Euler first."""

import math

import torch

from sid.sampling import euler_sampler, heun_sampler
from sid.schedules import karras_sigmas
from sid.teachers.analytic import GaussianMixture


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
