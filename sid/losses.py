"""The two losses of identity-based distillation (docs/losses.md): pure per-sample functions, and the object that
binds their constants once from the config.

Every function returns one value per sample ([B]); NaN policy, accumulation and optimisers belong to the
trainer. λ's names (``sid``, ``fgm``, ...) are parsed where the config is read (``sid.config.resolve_lam``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from sid.augment import LABEL_DIM, GeometricAugment
from sid.config import CHOICES, resolve_lam
from sid.errors import SidError
from sid.guidance import concat, drop, guided
from sid.schedules import sample_lognormal_sigma, sample_sid_sigma, sample_timestep_sigma

WEIGHTINGS = CHOICES["loss.weighting"]


def _sum_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ_EDM(σ) = (σ² + σ_d²) / (σ σ_d)² (Karras et al. 2022, Eq. 8 and Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_loss(
    denoiser: Callable, x0: torch.Tensor, sigma: torch.Tensor, labels=None, *, sigma_data: float
) -> torch.Tensor:
    """EDM denoising score matching: λ_EDM(σ) Σ_j (D(x0 + σn) - x0)_j² (Karras et al. 2022, Eq. 2 and 8).

    The fake score's loss on (detached) generator samples x0 = x_g (SiD, Zhou et al. 2024), and the loss
    that trains a teacher on data. ``sigma`` is [B].
    """
    return edm_loss_weight(sigma, sigma_data) * _squared_error(denoiser, x0, sigma, labels)


fake_score_loss = denoising_loss  # f_ψ fits the generator's samples with the teacher's own training loss


def flow_matching_loss(denoiser: Callable, x0: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
    """Rectified-flow matching ‖v̂ - v‖², v = ε - x0 at x_t = (1 - t) x0 + t ε (Liu et al. 2022; SD3), in EDM units:
    σ = t / (1 - t) and D = x_t - t v̂ (``FlowRule``), so v̂ - v = (x0 - D) / t and the weight is 1/t².
    ln σ = logit t: a log-normal σ is SD3's logit-normal t."""
    t = sigma / (1 + sigma)
    return _squared_error(denoiser, x0, sigma, labels) / t**2


def _squared_error(denoiser: Callable, x0: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
    """Σ_j (D(x0 + σn; σ) - x0)_j² per sample, n ~ N(0, I)."""
    s = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    return _sum_per_sample((denoiser(x0 + s * torch.randn_like(x0), sigma, labels) - x0) ** 2)


def identity_loss(f_teacher: torch.Tensor, f_fake: torch.Tensor, x_g: torch.Tensor, lam: float) -> torch.Tensor:
    """L^x0_λ = Σ_j (f_φ - f_ψ)_j [(f_φ - x_g)_j - λ (f_φ - f_ψ)_j] (SiD, Eq. 22; docs/losses.md)."""
    delta = f_teacher - f_fake
    return _sum_per_sample(delta * ((f_teacher - x_g) - lam * delta))


def sid_weight(x_g: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
    """SiD's per-sample ω = 1 / max(mean_j |x_g - f_φ|_j, 1e-5), stop-gradient (SiD, training/sid_loss.py)."""
    return 1 / (x_g - f_teacher).detach().abs().flatten(1).mean(1).clamp_min(1e-5)


def loss_weight(weighting: str, sigma: torch.Tensor, x_g: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of the generator loss: ``sid`` (ω above), ``x0`` (1), ``eps`` (1/σ², the loss's ε-form),
    and for flow time t = σ / (1 + σ): ``one_minus_t`` (SiD-DiT's default, 1 − t) and ``velocity`` (2/t²: the
    loss in velocity units, v̂ − v = (x0 − D)/t, where λ = ½ is FGM's L1 + L2 and RealUID's loss; sid-math §3.5)."""
    if weighting == "sid":
        return sid_weight(x_g, f_teacher)
    if weighting == "x0":
        return torch.ones_like(sigma)
    if weighting == "eps":
        return sigma**-2
    if weighting == "one_minus_t":
        return 1 / (1 + sigma)
    if weighting == "velocity":
        return 2 * ((1 + sigma) / sigma) ** 2
    raise SidError(f"loss.weighting={weighting!r} is unknown; choose one of {WEIGHTINGS}")


def predictions(teacher: Callable, fake_score: Callable, x_g: torch.Tensor, sigma: torch.Tensor,
                labels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """f_φ and f_ψ at x_t = x_g + σn, n ~ N(0, I) drawn here: what every member's generator loss is made of."""
    x_t = x_g + sigma.reshape(-1, *[1] * (x_g.ndim - 1)) * torch.randn_like(x_g)
    return teacher(x_t, sigma, labels), fake_score(x_t, sigma, labels)


def generator_loss(
    teacher: Callable,
    fake_score: Callable,
    x_g: torch.Tensor,
    sigma: torch.Tensor,
    labels=None,
    *,
    lam: float,
    weighting: str = "sid",
) -> torch.Tensor:
    """w · L^x0_λ at x_t = x_g + σn: gradients reach θ through x_g and, via x_t, through both f_φ and f_ψ.

    Neither prediction is detached: the caller freezes the parameters of both networks, not their inputs.
    """
    f_teacher, f_fake = predictions(teacher, fake_score, x_g, sigma, labels)
    return loss_weight(weighting, sigma, x_g, f_teacher) * identity_loss(f_teacher, f_fake, x_g, lam)


def dmd_loss(teacher: Callable, fake_score: Callable, x_g: torch.Tensor, sigma: torch.Tensor, labels=None, *,
             weighting: str = "sid") -> torch.Tensor:
    """DMD / VSD (Yin et al. 2024; Wang et al. 2023): ½ Σ_j (x_g − sg[x_g − w (f_ψ − f_φ)])_j², whose gradient
    w.r.t. x_g is w (f_ψ − f_φ), through x_g alone: SiD's loss with both outputs detached, for any λ. The networks
    run without a graph (no activations kept), which is the member's saving."""
    with torch.no_grad():
        f_teacher, f_fake = predictions(teacher, fake_score, x_g.detach(), sigma, labels)
        w = loss_weight(weighting, sigma, x_g, f_teacher).reshape(-1, *[1] * (x_g.ndim - 1))
        target = x_g - w * (f_fake - f_teacher)
    return 0.5 * _sum_per_sample((x_g - target) ** 2)


def sim_loss(teacher: Callable, fake_score: Callable, x_g: torch.Tensor, sigma: torch.Tensor, labels=None, *,
             c: float, weighting: str = "sid") -> torch.Tensor:
    """SIM (Luo et al. 2024, Algorithm 1): −d'(y)ᵀ (s_ψ(x_t) − ∇ log q(x_t | x_g)) for the pseudo-Huber
    d(y) = √(‖y‖² + c²) − c of the score difference y = s_ψ − s_φ, the networks' parameters frozen and their inputs
    differentiable (nothing else detached), which by SIM's score-gradient theorem has the gradient of the divergence
    E_{x_t ~ sg p_θ} d(s_θ − s_φ). With scores s = (D − x_t)/σ² and ∇ log q = (x_g − x_t)/σ², it is

        ⟨Δ, f_ψ − x_g⟩ / (σ² √(‖Δ‖² + c²σ⁴)),   Δ = f_φ − f_ψ,

    returned here times w c σ⁴, a per-σ weight of SIM's integral, so that c → ∞ is SiD's w L_1 (docs/losses.md)."""
    f_teacher, f_fake = predictions(teacher, fake_score, x_g, sigma, labels)
    delta = f_teacher - f_fake
    scale = c * sigma**2 / (_sum_per_sample(delta**2) + (c * sigma**2) ** 2).sqrt()
    return loss_weight(weighting, sigma, x_g, f_teacher) * scale * _sum_per_sample(delta * (f_fake - x_g))


# SiDA (Zhou et al., ICLR 2025): the fake score is also the discriminator, its logit read from its own encoder ------

class EncoderLogits:
    """SiDA's logit: the channel mean of the output of a network's last encoder block (``Teacher.encoder_end``),
    caught by a forward hook as the network runs, so the denoiser contract stays one call. Registered once, before
    any compilation; ``logits()`` is the last forward's, [B, 1, h, w] (an MLP's: [B, 1]), at least float32."""

    def __init__(self, block: torch.nn.Module):
        self.features = None
        self.handle = block.register_forward_hook(self.catch)

    def catch(self, module, inputs, output) -> None:
        self.features = output[0] if isinstance(output, tuple) else output

    def logits(self) -> torch.Tensor:
        if self.features is None:
            raise SidError("SiDA's logit was read before the fake score ran")
        features, self.features = self.features, None
        return features.mean(1, keepdim=True, dtype=torch.promote_types(features.dtype, torch.float32))


def bce_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """The binary cross-entropy of ``logits`` against one label, the mean over every element of the micro-batch
    (``BCEWithLogitsLoss()``, as SiDA's code reduces it): one number shared by the batch."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def sida_fake_losses(fake_score: Callable, logits: Callable[[], torch.Tensor], x0: torch.Tensor, x_real: torch.Tensor,
                     sigma: torch.Tensor, labels=None, *, sigma_data: float,
                     fake_weight: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiDA's fake-score step (sida_loss.py, fakescore_discriminator_share_encoder_loss), per sample: the denoising
    loss λ_EDM(σ) Σ_j (D_ψ(x0 + σn) − x0)_j² on the detached generator samples x0, and the discriminator term
    λ_EDM(σ) ½ [BCE(ℓ(x_real + σn), 1) + BCE(ℓ(x0 + σn), 0)], ℓ the encoder logit, real and generated samples at the
    same σ and n, in one forward of the fake score (the real images' denoised output is not used). ``fake_weight``:
    the denoising loss's weight of σ instead of λ_EDM (``loss.fake_loss=native``)."""
    s = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    n = torch.randn_like(x0)
    denoised = fake_score(torch.cat([x0 + s * n, x_real + s * n]), torch.cat([sigma, sigma]), concat(labels, labels))
    fake_logits, real_logits = logits().chunk(2)
    weight = edm_loss_weight(sigma, sigma_data)
    denoise = (weight if fake_weight is None else fake_weight(sigma)) * _sum_per_sample((denoised[:len(x0)] - x0) ** 2)
    return denoise, weight * (bce_logits(real_logits, 1.0) + bce_logits(fake_logits, 0.0)) / 2


def sida_generator_losses(teacher: Callable, fake_score: Callable, logits: Callable[[], torch.Tensor],
                          x_g: torch.Tensor, sigma: torch.Tensor, labels=None, *, lam: float,
                          weighting: str = "sid") -> tuple[torch.Tensor, torch.Tensor]:
    """SiDA's generator terms (sida_loss.py, generator_share_encoder_loss), per sample: SiD's w · L_λ, and the
    adversarial ω · BCE(clamp(ℓ(x_t), ±10), 1) · CHW, ℓ the fake score's encoder logit in the same forward as f_ψ
    and ω SiD's weight (stopped) whatever ``weighting`` is; the BCE is the micro-batch's mean."""
    f_teacher, f_fake = predictions(teacher, fake_score, x_g, sigma, labels)
    gan = sid_weight(x_g, f_teacher) * bce_logits(logits().clamp(-10, 10), 1.0) * x_g[0].numel()
    return loss_weight(weighting, sigma, x_g, f_teacher) * identity_loss(f_teacher, f_fake, x_g, lam), gan


@dataclass(frozen=True)
class DistillationLoss:
    """Both losses of one run with every constant bound: the σ samplers, λ, the weighting and the reduction.

    Each method draws its σ and returns per-sample losses already in SiD's reduction: times the loss's scale
    (``ls``, ``lsg``) over the per-process batch, so that summed over a process's micro-batches they give the
    official ``loss.sum() * scale / batch_per_process``.
    """

    lam: float                          # λ (SiD's α)
    weighting: str                      # sid | x0 | eps
    t_max: float                        # generator loss: σ = karras(u), u ~ U[0, t_max)
    sigma_min: float
    sigma_max: float
    rho: float
    p_mean: float                       # fake-score loss: ln σ ~ N(p_mean, p_std²)
    p_std: float
    sigma_data: float                   # the fake score's λ_EDM(σ) weight
    g_scale: float                      # lsg / per-process batch
    fake_scale: float                   # ls / per-process batch
    augment: GeometricAugment | None = None   # the fake-score step's augmentation (SiD's --augment)
    guide_fake_train: float = 1.0       # κ1, κ2 (= κ3), κ4 of SiD-LSG: guidance.guided on f_ψ in its own loss,
    guide_fake: float = 1.0             # on f_ψ in the generator loss, on f_φ in the generator loss
    guide_teacher: float = 1.0
    drop_cond: float = 0.0              # the fake step's conditions → the null one at this rate (0: never)
    null: Callable | None = None        # n -> the teacher family's null condition for n samples
    guide: Callable | None = None       # (f_φ, κ4) -> f_φ guided as the teacher is (``Teacher.guide``); None: CFG
    time: str = "karras"                # karras | timesteps | logit_normal: the σ samplers of both steps
    timestep_sigmas: torch.Tensor | None = None   # time=timesteps: the teacher's σ_k, k = 0..K-1
    timesteps: tuple[int, int] = (20, 979)        # ... and the range of k, both ends included
    fake_weight: Callable | None = None  # σ -> the fake-score loss weight; None: λ_EDM(σ) with sigma_data
    kind: str = "sid"                   # sid: ``generator_loss`` (SiD, FGM by λ) | dmd: ``dmd_loss`` | sida | sim
    sim_c: float = 1.0                  # sim: the pseudo-Huber c (score units)
    gan_scale: float = 0.0              # sida: c_GAN / per-process batch (the generator's adversarial term)
    d_scale: float = 0.0                # sida: c_D / per-process batch (the fake score's discriminator term)

    @classmethod
    def from_config(cls, loss, teacher, per_process: int) -> DistillationLoss:
        """From the ``loss`` section and the ``Teacher``: the generator loss's σ range defaults to the teacher
        denoiser's; augmentation needs a network told the draw by its augment labels."""
        if loss.augment and teacher.augment_dim != LABEL_DIM:
            raise SidError(f"loss.augment={loss.augment:g} needs a teacher whose network takes {LABEL_DIM} augment "
                           f"labels (EDM's CIFAR-10 networks); this one takes {teacher.augment_dim}, so the fake "
                           "score could not tell augmented samples from generated ones: set loss.augment=0")
        d = teacher.denoiser
        lo, hi = loss.sigma_min or d.sigma_min, loss.sigma_max or d.sigma_max
        if not 0 < lo < hi:
            raise SidError(f"the generator loss's σ range [{lo:g}, {hi:g}] is empty (loss.sigma_min, loss.sigma_max; "
                           f"null: the teacher's [{d.sigma_min:g}, {d.sigma_max:g}])")
        scales = {key: float(loss[key]) for key in ("guide_fake_train", "guide_fake", "guide_teacher")}
        guides_fake = scales["guide_fake_train"] != 1 or scales["guide_fake"] != 1
        null = teacher.null_condition if any(v != 1 for v in scales.values()) else None
        if null is not None and null(1) is None:
            named = ", ".join(f"loss.{k}={v:g}" for k, v in scales.items() if v != 1)
            what = "has no null condition" if teacher.label_dim else "is unconditional"
            raise SidError(f"{named}: guidance needs a conditional teacher with a null condition, and this "
                           f"{teacher.spec['kind']} teacher {what}; leave the guidance scales at 1")
        native = dict(time=loss.time, fake_weight=teacher.training_weight if loss.fake_loss == "native" else None)
        if loss.fake_loss == "native":
            teacher.training_weight(torch.ones(1))              # a teacher without a known loss: one line here
        if loss.time == "timesteps":
            sigmas, (first, last) = teacher.timestep_sigmas(), loss.timesteps
            if sigmas is None:
                raise SidError(f"loss.time=timesteps needs a teacher with discrete timesteps (a diffusers DDPM-style "
                               f"schedule); this {teacher.spec['kind']} teacher's time is continuous: use "
                               "loss.time=karras or logit_normal")
            if last >= len(sigmas):
                raise SidError(f"loss.timesteps={list(loss.timesteps)} goes past the teacher's {len(sigmas)} "
                               f"timesteps (0..{len(sigmas) - 1})")
            native.update(timestep_sigmas=sigmas, timesteps=(int(first), int(last)))
        return cls(lam=resolve_lam(loss.lam), kind=loss.kind, weighting=loss.weighting, t_max=loss.t_max,
                   sigma_min=loss.sigma_min or d.sigma_min, sigma_max=loss.sigma_max or d.sigma_max,
                   rho=loss.rho, p_mean=loss.p_mean, p_std=loss.p_std, sigma_data=d.sigma_data,
                   g_scale=loss.g_scale / per_process, fake_scale=loss.fake_scale / per_process,
                   augment=GeometricAugment(loss.augment) if loss.augment else None, **scales,
                   drop_cond=loss.drop_cond if guides_fake else 0.0, null=null, guide=teacher.guide,
                   sim_c=loss.sim_c, gan_scale=loss.gan_scale / per_process, d_scale=loss.d_scale / per_process,
                   **native)

    def fake_conditions(self, cond):
        """The fake step's conditions: each replaced by the null one at rate ``drop_cond`` (SiD-LSG drops 10% of
        the prompts when the fake score is guided, before the generator draws its samples)."""
        return drop(cond, self.drop_cond, self.null)

    def fake_score(self, fake_score: Callable, x_g: torch.Tensor, labels=None) -> torch.Tensor:
        """The fake score's denoising loss on the (detached) generator samples, at σ log-normal (or the teacher's
        timesteps), weighted by λ_EDM or the teacher's own loss (``fake_weight``); with augmentation, on the
        augmented samples, the network given the augment labels (SiD, training/sid_loss.py: σ drawn, then the
        augmentation, then the noise)."""
        sigma = self.fake_sigma(len(x_g), x_g.device, x_g.dtype)
        x0, net = x_g.detach(), guided(fake_score, self.guide_fake_train, self.null)
        if self.augment is not None:
            x0, augment_labels = self.augment(x0)
            net = partial(net, augment_labels=augment_labels)
        if self.fake_weight is None:
            return fake_score_loss(net, x0, sigma, labels, sigma_data=self.sigma_data) * self.fake_scale
        return self.fake_weight(sigma) * _squared_error(net, x0, sigma, labels) * self.fake_scale

    def fake_score_adversarial(self, fake_score: Callable, logits: Callable[[], torch.Tensor], x_g: torch.Tensor,
                               x_real: torch.Tensor, labels=None) -> torch.Tensor:
        """SiDA's fake-score step: the denoising loss (weighted as ``fake_score``'s) plus c_D times the
        discriminator term, on the generator's detached samples and the real images, each augmented by its own
        draw where ``augment`` is on (SiDA's code augments them apart)."""
        sigma = self.fake_sigma(len(x_g), x_g.device, x_g.dtype)
        x0, net = x_g.detach(), fake_score
        if self.augment is not None:
            (x0, fake_labels), (x_real, real_labels) = self.augment(x0), self.augment(x_real)
            net = partial(net, augment_labels=torch.cat([fake_labels, real_labels]))
        denoise, discriminate = sida_fake_losses(net, logits, x0, x_real, sigma, labels, sigma_data=self.sigma_data,
                                                 fake_weight=self.fake_weight)
        return denoise * self.fake_scale + discriminate * self.d_scale

    def fake_sigma(self, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The fake-score loss's σ: log-normal (SiD; SiD-DiT's logit-normal t), or the teacher's timesteps (its
        float64 table rounded to the samples' ``dtype``)."""
        if self.time == "timesteps":
            return sample_timestep_sigma(n, self.timestep_sigmas, *self.timesteps).to(device, dtype)
        return sample_lognormal_sigma(n, self.p_mean, self.p_std, device=device)

    def generator_sigma(self, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """The generator loss's σ: SiD's Karras σ below t_max, the teacher's timesteps (in ``dtype``, as
        ``fake_sigma``), or log-normal."""
        if self.time == "timesteps":
            return sample_timestep_sigma(n, self.timestep_sigmas, *self.timesteps).to(device, dtype)
        if self.time == "logit_normal":
            return sample_lognormal_sigma(n, self.p_mean, self.p_std, device=device)
        return sample_sid_sigma(n, self.t_max, self.sigma_min, self.sigma_max, self.rho, device=device)

    def generator(self, teacher: Callable, fake_score: Callable, x_g: torch.Tensor, labels=None,
                  logits: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """The generator loss w · L_λ at ``generator_sigma``; with SiDA's encoder ``logits`` (its adversarial term
        on), ½ of it plus ½ c_GAN times the adversarial term (sida_training_loop.py)."""
        sigma = self.generator_sigma(len(x_g), x_g.device, x_g.dtype)
        guide = self.guide or (lambda net, scale: guided(net, scale, self.null))
        teacher, fake_score = guide(teacher, self.guide_teacher), guided(fake_score, self.guide_fake, self.null)
        if logits is not None:
            sid, gan = sida_generator_losses(teacher, fake_score, logits, x_g, sigma, labels, lam=self.lam,
                                             weighting=self.weighting)
            return 0.5 * sid * self.g_scale + 0.5 * gan * self.gan_scale
        if self.kind == "sim":
            sim = sim_loss(teacher, fake_score, x_g, sigma, labels, c=self.sim_c, weighting=self.weighting)
            return sim * self.g_scale
        if self.kind == "dmd":
            return dmd_loss(teacher, fake_score, x_g, sigma, labels, weighting=self.weighting) * self.g_scale
        return generator_loss(teacher, fake_score, x_g, sigma, labels, lam=self.lam,
                              weighting=self.weighting) * self.g_scale
