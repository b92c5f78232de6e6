"""The denoiser contract and the continuous coefficient rules (sid/precond.py): each rule, wrapped around the
network that a perfect model of its parameterisation would be, recovers the exact denoiser of a Gaussian mixture;
the precision boundary; states saved under the rule's former name."""

import math

import pytest
import torch
from torch import nn

from sid.precond import ContinuousVPRule, EDMRule, FlowRule, Preconditioned, VERule
from sid.teachers.analytic import GaussianMixture

GMM = GaussianMixture([0.2, 0.5, 0.3], torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)),
                      [0.3, 0.5, 0.8])
SIGMAS = torch.logspace(-2.5, 1.9, 9, dtype=torch.float64)


def noisy(sigmas):
    g = torch.Generator().manual_seed(2)
    return GMM.sample(len(sigmas), g) + sigmas.view(-1, 1, 1, 1) * torch.randn(len(sigmas), 2, 4, 4, generator=g,
                                                                                 dtype=torch.float64)


class ExactNet(nn.Module):
    """F = (D_exact(x) - c_skip x) / c_out at x = x_in / c_in: what a perfect network under ``rule`` outputs, with σ
    read back from the c_noise it is fed (``sigma_of``, each rule's inverse)."""

    def __init__(self, rule, sigma_of):
        super().__init__()
        self.rule, self.sigma_of = rule, sigma_of

    def forward(self, x_in, c_noise, labels=None):
        sigma = self.sigma_of(c_noise)
        c = self.rule(sigma.view(-1, 1, 1, 1))
        x = x_in / c.c_in
        return (GMM(x, sigma) - c.c_skip * x) / c.c_out


def vp_sigma(c_noise, beta_d=19.9, beta_min=0.1, M=1000):
    t = c_noise / (M - 1)
    return ((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt()               # EDM's VPPrecond.sigma(t)


RULES = {
    "edm": (EDMRule(0.5), lambda c: (4 * c).exp()),
    "vp": (ContinuousVPRule(), vp_sigma),
    "ve": (VERule(), lambda c: 2 * c.exp()),
    "flow": (FlowRule(), lambda c: (c / 1000) / (1 - c / 1000)),
}


@pytest.mark.parametrize("name", list(RULES))
def test_each_rule_recovers_the_exact_denoiser(name):
    rule, sigma_of = RULES[name]
    denoiser = Preconditioned(ExactNet(rule, sigma_of), rule)
    x = noisy(SIGMAS)
    torch.testing.assert_close(denoiser(x, SIGMAS), GMM(x, SIGMAS), rtol=1e-9, atol=1e-9)


class ExactFlowNet(nn.Module):
    """What a perfect flow-matching network outputs, written in flow terms: v = ε - x0 at x_t = (1 - t) x0 + t ε,
    t = timestep / 1000 (an independent check of FlowRule's algebra)."""

    def forward(self, x_t, timestep, labels=None):
        t = (timestep / 1000).view(-1, 1, 1, 1)
        x0 = GMM(x_t / (1 - t), (t / (1 - t)).flatten())       # E[x0 | x_t]: the same x in EDM units
        eps = (x_t - (1 - t) * x0) / t
        return eps - x0


def test_the_flow_rule_recovers_the_exact_denoiser_of_a_network_written_in_flow_terms():
    denoiser = Preconditioned(ExactFlowNet(), FlowRule())
    x = noisy(SIGMAS)
    torch.testing.assert_close(denoiser(x, SIGMAS), GMM(x, SIGMAS), rtol=1e-9, atol=1e-9)


def test_edm_coefficients_at_sigma_init():
    c = EDMRule(0.5)(torch.tensor(2.5, dtype=torch.float64))
    assert abs(c.c_skip - 1 / 26) < 1e-6 and abs(c.c_out - 0.490290) < 1e-6
    assert abs(c.c_in - 0.392232) < 1e-6 and abs(c.c_noise - 0.229073) < 1e-6


def test_continuous_vp_noise_input():
    """c_noise = (M - 1) t(σ), t(σ) = (sqrt(β_min² + 2 β_d ln(1 + σ²)) - β_min) / β_d: the inverse of σ(t)."""
    t = torch.linspace(1e-5, 1, 11, dtype=torch.float64)
    sigma = vp_sigma(999 * t)
    torch.testing.assert_close(ContinuousVPRule()(sigma).c_noise, 999 * t)
    assert math.isclose(float(ContinuousVPRule()(torch.tensor(2.5)).c_out), -2.5)


def test_the_boundary_is_float32_and_float64_stays_float64():
    denoiser = Preconditioned(ConvNet(), EDMRule())
    x = torch.randn(2, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert denoiser(x, 1.0).dtype == torch.float32
        assert denoiser(x.half(), 1.0).dtype == torch.float32
    assert denoiser.double()(x.double(), 1.0).dtype == torch.float64


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x_in, c_noise, labels=None):
        return self.conv(x_in) + c_noise.view(-1, 1, 1, 1).to(x_in.dtype)


class BufferedRule(EDMRule):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(3))


def test_states_saved_under_the_rules_former_name_load():
    """Exports and training states written when ``Preconditioned``'s rule was called ``precond`` keep its buffers
    under that name (e.g. a discrete VP rule's log σ table): they load into today's ``rule``."""
    old = {"net.conv.weight": torch.ones(2, 2, 1, 1), "net.conv.bias": torch.zeros(2), "precond.table": torch.ones(3)}
    denoiser = Preconditioned(ConvNet(), BufferedRule())
    denoiser.load_state_dict(old)
    assert torch.equal(denoiser.rule.table, torch.ones(3))
    outer = nn.ModuleDict({"denoiser": Preconditioned(ConvNet(), BufferedRule())})
    outer.load_state_dict({f"denoiser.{k}": 2 * v for k, v in old.items()})      # nested, as in a generator
    assert torch.equal(outer["denoiser"].rule.table, 2 * torch.ones(3))
