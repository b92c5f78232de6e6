"""Coefficient rules from diffusers scheduler configs: what a model predicts (ε, v, x0, EDM-preconditioned or flow
velocity) and on which schedule, as the rule that puts it under the denoiser contract (``sid/precond.py``).

The only place that knows timestep indices and prediction types.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn

from sid.config import CHOICES
from sid.errors import SidError
from sid.precond import Coefficients, EDMRule, FlowRule

PREDICTION_TYPES = tuple(c for c in CHOICES["teacher.diffusers.prediction_type"] if c)     # the schema's list
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


class DiscreteVPRule(nn.Module):
    """A VP network on diffusers' discrete schedule in EDM units: σ_k = sqrt((1 - ā_k) / ā_k) for ā =
    ``alphas_cumprod``, x_t = x / sqrt(1 + σ²), and the network's ε, v or x0 turned into x0 (Karras et al. 2022,
    Table 1's VP column on a discrete grid; v-prediction: Salimans & Ho 2022).

    Continuous σ maps to a fractional timestep by linear interpolation of k in ln σ.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, sigma_data: float = 0.5):
        super().__init__()
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        log_sigmas = ((1 - ac) / ac).sqrt().log()                                  # [K], increasing in k
        if ac[-1] <= 0:
            # A zero-terminal-SNR schedule (rescale_betas_zero_snr) ends at ā = 0, σ = ∞. diffusers' Euler clips
            # ā there to 2^-24, which puts σ_999 below σ_998; a map σ <-> t needs σ increasing, so the last σ is
            # extrapolated in ln σ from the two before it instead.
            log_sigmas[-1] = 2 * log_sigmas[-2] - log_sigmas[-3]
        self.register_buffer("log_sigmas", log_sigmas)
        self.prediction_type, self.sigma_data = prediction_type, sigma_data
        self.sigma_min, self.sigma_max = float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep of σ; exactly k where σ is the table's σ_k in σ's own precision (a float32 σ_k
        would otherwise land within 3e-5 of k, and the network be fed k ± 3e-5 where SiD-LSG feeds k)."""
        log_sigma = sigma.double().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo_val, hi_val = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        t = hi - 1 + (log_sigma - lo_val) / (hi_val - lo_val)
        table = self.timestep_sigmas().to(sigma.dtype)
        for k in (hi - 1, hi):                                   # σ_k is one of the two ends of its interval
            t = torch.where(table[k] == sigma, k.double(), t)
        return t.to(sigma.dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double().clamp(0, len(self.log_sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        frac = t - lo
        return ((1 - frac) * self.log_sigmas[lo] + frac * self.log_sigmas[lo + 1]).exp()

    def training_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """ε-MSE, 1/σ², for ε-networks; for v-networks v-MSE × snr/(snr + 1) (SiD-LSG), which is the same 1/σ²
        (x0 − D = sqrt(1 − ā) (v̂ − v), snr = 1/σ²); x0-MSE, 1, for "sample" networks."""
        return torch.ones_like(sigma) if self.prediction_type == "sample" else sigma**-2

    def timestep_sigmas(self) -> torch.Tensor:
        """σ_k = sqrt((1 − ā_k) / ā_k), k = 0 .. K − 1 (float64, on the rule's device; a σ drawn from it and rounded
        to the sample's precision is still fed to the network as the integer k: ``sigma_to_t``)."""
        return self.log_sigmas.exp()

    def step_sigmas(self, sigma_init: float, steps: int) -> list[float]:
        """σ of a K-step generator's steps at timesteps t_init (1 − i / K) (``sid.steps``): where σ_init is timestep
        k's σ, each truncated to an integer as SiD-LSG's sampler computes it (``(k * (1 − i / K)).to(long)`` in
        float32); else at the fractional ones."""
        t_init = float(self.sigma_to_t(torch.tensor([sigma_init])))          # as the generator feeds σ: float32
        if t_init != round(t_init):
            t = torch.tensor([t_init * (1 - i / steps) for i in range(1, steps)], dtype=torch.float64)
            return [float(sigma_init), *map(float, self.t_to_sigma(t))]
        k = torch.tensor(int(t_init))
        table = self.timestep_sigmas()
        return [float(sigma_init), *(float(table[(k * (1 - i / steps)).to(torch.long)]) for i in range(1, steps))]

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        total = 1 + sigma**2
        c_in, t = total.rsqrt(), self.sigma_to_t(sigma)
        if self.prediction_type == "epsilon":                    # x0 = x - σ ε
            c_skip, c_out = torch.ones_like(sigma), -sigma
        elif self.prediction_type == "v_prediction":             # x0 = x / (1 + σ²) - σ v / sqrt(1 + σ²)
            c_skip, c_out = 1 / total, -sigma * c_in
        else:                                                    # "sample": the network predicts x0
            c_skip, c_out = torch.zeros_like(sigma), torch.ones_like(sigma)
        return Coefficients(c_skip, c_out, c_in, t)


class EDMVPredictionRule(EDMRule):
    """diffusers' EDM schedulers with ``prediction_type="v_prediction"``: the network outputs -F, so c_out
    changes sign (D = c_skip x - c_out F); everything else is EDM's rule."""

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        c = super().forward(sigma)
        return c._replace(c_out=-c.c_out)


def edm_output(scheduler_config: dict | None) -> str:
    """What an EDM-preconditioned UNet outputs: its EDM scheduler's ``prediction_type``, else ε."""
    cfg = scheduler_config or {}
    return cfg.get("prediction_type", "epsilon") if cfg.get("_class_name") in EDM_SCHEDULERS else "epsilon"


def prediction_of(scheduler_config: dict | None) -> str:
    """What a model predicts, read from its scheduler's config: edm for EDM schedulers, flow for flow-matching
    ones (and DPM-Solver's ``flow_prediction``, as Sana's), else the config's prediction_type (ε by default)."""
    sched = scheduler_config or {}
    kind = sched.get("_class_name")
    flow = kind in FLOW_SCHEDULERS or sched.get("prediction_type") == "flow_prediction"    # DPM-Solver on flows
    return "edm" if kind in EDM_SCHEDULERS else "flow" if flow else sched.get("prediction_type", "epsilon")


def rule_of(prediction_type: str, scheduler_config: dict | None, sigma_data: float = 0.5) -> nn.Module:
    """The coefficient rule of a diffusers model's parameterisation and scheduler."""
    if prediction_type not in PREDICTION_TYPES:
        raise SidError(f"prediction_type={prediction_type!r} is unknown; choose one of {PREDICTION_TYPES}")
    cfg = scheduler_config or {}
    if prediction_type == "edm":
        output = edm_output(cfg)
        if output not in ("epsilon", "v_prediction"):
            raise SidError(f"EDM scheduler with prediction_type={output!r}: only epsilon and v_prediction are defined")
        rule_class = EDMVPredictionRule if output == "v_prediction" else EDMRule
        return rule_class(cfg.get("sigma_data", sigma_data), cfg.get("sigma_min", 0.002), cfg.get("sigma_max", 80.0))
    if prediction_type == "flow":
        return FlowRule(cfg.get("num_train_timesteps", 1000), sigma_data=sigma_data)
    return DiscreteVPRule(DDPMScheduler.from_config(cfg).alphas_cumprod, prediction_type, sigma_data)
