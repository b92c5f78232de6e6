"""`sid`'s losses against a transcription of the official SiD code, so that a drift from it cannot go unnoticed.

The oracle below is a transcription, written for this test, of ``SID_EDMLoss.generator_loss`` and
``SID_EDMLoss.__call__`` in ``training/sid_loss.py`` of github.com/mingyuanzhou/SiD at commit 01fbb13c
(2025-03-19), with the reduction its training loop applies (``training/sid_training_loop.py``:
``loss.sum().mul(loss_scaling / batch_gpu_total)``, ``loss_scaling_G`` for the generator). Every constant,
reduction and detach is as there: σ = (σ_max^(1/ρ) + (1 − u)(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ with
u = rand · tmax / 1000 and σ_min = 0.002, σ_max = 80, ρ = 7; the weight is the mean over C, H, W of
|x_g − f_φ|, detached, clamped below at 1e-5 and cast to float32; the per-element loss
(f_φ − f_ψ)((f_φ − x_g) − α(f_φ − f_ψ)) / weight is summed and scaled by lsg over the per-process batch;
samples with NaN are dropped. The fake-score loss draws ln σ ~ N(P_mean, P_std²) with EDM's weight
(σ² + σ_d²)/(σ σ_d)², summed and scaled by ls over the per-process batch.

Both sides draw their random numbers in the same order (σ's uniforms or normals, then the noise), so with one
seed they see the same σ and noise. The images and networks are float64; σ is float32 on both sides, as the
official code draws it in the default dtype, and the two arrangements of the Karras formula (algebraically
identical) round differently there, by about 1e-7 relative. The official weight's cast to float32 rounds it by
less than 6e-8. Losses and gradients (in norm) must therefore agree to 1e-6 relative, a tolerance above those
roundings and far below a change of a constant, a reduction or a detach.
"""

import pytest
import torch

from sid.config import load_config
from sid.losses import DistillationLoss
from sid.runtime import keep_finite
from sid.teachers import Teacher
from sid.teachers.analytic import GaussianMixture

LAMS = [0.0, 0.5, 1.0, 1.2]
B, SHAPE = 6, (3, 4, 4)


# The oracle: the official losses, transcribed --------------------------------------------------------------------

def official_generator_loss(true_score, fake_score, images, alpha, tmax=800, lsg=100.0, batch_gpu_total=B):
    sigma_min, sigma_max, rho = 0.002, 80, 7.0
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    rnd_t = torch.rand([images.shape[0], 1, 1, 1], device=images.device) * tmax / 1000
    sigma = (max_inv_rho + (1 - rnd_t) * (min_inv_rho - max_inv_rho)) ** rho
    y = images                                                   # augment_pipe=None in the generator step
    n = torch.randn_like(y) * sigma
    y_real = true_score(y + n, sigma)
    y_fake = fake_score(y + n, sigma)
    nan_mask = (torch.isnan(y).flatten(1).any(1) | torch.isnan(y_real).flatten(1).any(1)
                | torch.isnan(y_fake).flatten(1).any(1))
    if nan_mask.any():
        y, y_real, y_fake = y[~nan_mask], y_real[~nan_mask], y_fake[~nan_mask]
    with torch.no_grad():
        weight_factor = abs(y - y_real).to(torch.float32).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
    loss = (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / weight_factor
    return loss.sum().mul(lsg / batch_gpu_total)


def official_fake_score_loss(fake_score, images, P_mean=-1.2, P_std=1.2, sigma_data=0.5, ls=1.0,
                             batch_gpu_total=B):
    rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    y = images
    n = torch.randn_like(y) * sigma
    y_fake = fake_score(y + n, sigma)
    nan_mask = torch.isnan(y).flatten(1).any(1) | torch.isnan(y_fake).flatten(1).any(1)
    if nan_mask.any():
        y_fake, y, weight = y_fake[~nan_mask], y[~nan_mask], weight[~nan_mask]
    loss = weight * ((y_fake - y) ** 2)
    return loss.sum().mul(ls / batch_gpu_total)


# The networks: smooth, nonlinear, float64, with parameters ------------------------------------------------------

class Net(torch.nn.Module):
    """A small denoiser in float64 whose output depends nonlinearly on x and σ ([B] or [B, 1, 1, 1])."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.3)
        self.sigma_min, self.sigma_max, self.sigma_data, self.label_dim = 0.002, 80.0, 0.5, 0

    def forward(self, x, sigma, labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return torch.tanh(self.a * x / (1 + s**2).sqrt() + self.b * s.log()) * (1 + 0.1 * s)


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def sid_loss(lam):
    cfg = load_config([], [f"loss.lam={lam}", "loss.weighting=sid", "loss.t_max=0.8"])
    teacher = Teacher(GaussianMixture([1.0], torch.zeros(1, *SHAPE), [0.5]), SHAPE, {"kind": "analytic"})
    return DistillationLoss.from_config(cfg.loss, teacher, per_process=B)


def images(nan_at=None):
    x = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if nan_at is not None:
        x[nan_at, 0, 0, 0] = float("nan")
    return x.requires_grad_(True)


@pytest.mark.parametrize("lam", LAMS)
def test_the_generator_loss_and_its_gradient_are_the_official_ones(lam):
    teacher, fake = Net(1).requires_grad_(False), Net(2).requires_grad_(False)
    x_official, x_ours = images(), images()
    torch.manual_seed(3)
    official = official_generator_loss(teacher, fake, x_official, alpha=lam)
    torch.manual_seed(3)
    ours = sid_loss(lam).generator(teacher, fake, x_ours).sum()
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=0)
    (g_official,) = torch.autograd.grad(official, x_official)
    (g_ours,) = torch.autograd.grad(ours, x_ours)
    assert relative(g_ours, g_official) < 1e-6


def test_a_nan_sample_is_dropped_as_officially():
    teacher, fake = Net(1).requires_grad_(False), Net(2).requires_grad_(False)
    torch.manual_seed(3)
    official = official_generator_loss(teacher, fake, images(nan_at=2), alpha=1.2)
    torch.manual_seed(3)
    ours, dropped = keep_finite(sid_loss(1.2).generator(teacher, fake, images(nan_at=2)))   # the trainer's policy
    assert int(dropped) == 1
    torch.testing.assert_close(ours.sum(), official, rtol=1e-6, atol=0)


def test_the_fake_score_loss_and_its_gradient_are_the_official_ones():
    official_net, our_net = Net(2), Net(2)
    x = images().detach()
    torch.manual_seed(4)
    official = official_fake_score_loss(official_net, x)
    torch.manual_seed(4)
    ours = sid_loss(1.2).fake_score(our_net, x).sum()
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=0)
    official.backward()
    ours.backward()
    for p_ours, p_official in zip(our_net.parameters(), official_net.parameters()):
        assert relative(p_ours.grad, p_official.grad) < 1e-6


# The preset: the official CIFAR-10 run's settings, one for one ---------------------------------------------------

# The official value of each setting (run_sid.sh cifar10-uncond; sid_train.py's defaults where the script sets
# none) and where `sid` keeps it.
OFFICIAL_CIFAR10 = {
    "loss.lam": ("sid", "--alpha 1.2"),
    "loss.weighting": ("sid", "1 / max(mean |x_g - f_phi|, 1e-5), sid_loss.py"),
    "loss.t_max": (0.8, "--tmax 800"),
    "loss.sigma_min": (0.002, "sid_loss.py: sigma_min = 0.002"),
    "loss.sigma_max": (80.0, "sid_loss.py: sigma_max = 80"),
    "loss.rho": (7.0, "sid_loss.py: rho = 7.0"),
    "generator.sigma_init": (2.5, "--init_sigma 2.5"),
    "loss.p_mean": (-1.2, "SID_EDMLoss(P_mean=-1.2)"),
    "loss.p_std": (1.2, "SID_EDMLoss(P_std=1.2)"),
    "loss.fake_scale": (1.0, "--ls 1"),
    "loss.g_scale": (100.0, "--lsg 100"),
    "optim.batch": (256, "--batch 256"),
    "optim.fake_lr": (1e-5, "--lr 1e-5"),
    "optim.g_lr": (1e-5, "--glr 1e-5"),
    "optim.fake_betas": ([0.0, 0.999], "betas=[0.0, 0.999]"),
    "optim.g_betas": ([0.0, 0.999], "betas=[opts.g_beta1 = 0, 0.999]"),
    "optim.eps": (1e-8, "eps = 1e-8 without fp16"),
    "ema.halflife_nimg": (500_000, "--ema 0.5 (Mimg)"),
    "ema.rampup": (0.05, "ema_rampup_ratio = 0.05"),
    "train.total_nimg": (500_000_000, "--duration 500 (Mimg)"),
    "loss.augment": (0.12, "--augment 0.12"),
    "teacher.edm_pickle.dropout": (0.13, "--dropout 0.13"),
    "teacher.edm_pickle.path": ("https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
                                "--edm_model cifar10-uncond"),
    "loss.reuse_generator_batch": (False, "a fresh generator batch in each step"),
}


@pytest.mark.parametrize("gpu", [False, True])
def test_the_cifar10_preset_is_the_official_run(gpu, monkeypatch):
    """Every setting as the official run has it, on any machine (the preset has no on_cpu part); precision is the
    one deliberate difference, stated in the preset and the README."""
    from omegaconf import OmegaConf

    monkeypatch.setattr("sid.config.gpu_visible", lambda: gpu)
    cfg = load_config(["cifar10_edm"])
    for key, (value, source) in OFFICIAL_CIFAR10.items():
        got = OmegaConf.to_container(node) if OmegaConf.is_config(node := OmegaConf.select(cfg, key)) else node
        assert got == value, (key, got, value, source)
    assert cfg.train.precision == "auto" and cfg.teacher.kind == "edm_pickle"


# SiD-LSG: the same losses on a discrete VP (ε) teacher at its own integer timesteps ------------------------------
#
# The oracle transcribes ``sid_sd_denoise`` (training/sid_sd_util.py) and the two steps of
# ``training/sid_training_loop.py`` of github.com/mingyuanzhou/SiD-LSG at commit 04f768a1 (κ = 1): t ~ U{tmin .. tmax
# − 1} (``torch.randint(20, 980)``), x_t = sqrt(ā_t) x0 + sqrt(1 − ā_t) n (``add_noise``), the UNet fed the integer
# t, x0 = (x_t − sqrt(1 − ā_t) ε) / sqrt(ā_t) (``step(...).pred_original_sample``), the generator loss as SiD's, the
# fake loss the plain ε-MSE, both summed and scaled over the per-process batch. It draws t, then the noise, as sid
# does (the official loop draws the noise first: an order of draws, not a formula). All in float64: ā from SD's
# scaled-linear β, the networks and images float64, so the two sides must agree to float64 rounding (1e-12).

SD_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2        # "scaled_linear"
ALPHAS_CUMPROD = torch.cumprod(1 - SD_BETAS, 0)


class EpsNet(torch.nn.Module):
    """A small ε-network in float64 of (x_t, timestep) that changes by a percent when its timestep moves by 1e-5,
    and records the timesteps it is fed."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.3)
        self.fed = []

    def forward(self, x_t, timestep, labels=None):
        self.fed.append(timestep.detach().clone())
        k = timestep.reshape(-1, 1, 1, 1)
        return torch.tanh(self.a * x_t) * (1 + 0.1 * torch.sin(1000 * k))


def official_lsg_x0(net, images, noise, timesteps):
    ac = ALPHAS_CUMPROD[timesteps].reshape(-1, 1, 1, 1)
    x_t = ac.sqrt() * images + (1 - ac).sqrt() * noise
    return (x_t - (1 - ac).sqrt() * net(x_t, timesteps.double())) / ac.sqrt()


def official_lsg_generator_loss(true_score, fake_score, images, alpha, lsg=1.0, batch_gpu_total=B):
    timesteps = torch.randint(20, 980, (images.shape[0],))
    noise = torch.randn_like(images)
    y_fake = official_lsg_x0(fake_score, images, noise, timesteps)
    y_real = official_lsg_x0(true_score, images, noise, timesteps)
    with torch.no_grad():
        weight_factor = abs(images - y_real).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
    loss = (y_real - y_fake) * ((y_real - images) - alpha * (y_real - y_fake)) / weight_factor
    return loss.sum().mul(lsg / batch_gpu_total)


def official_lsg_fake_score_loss(fake_score, images, ls=1.0, batch_gpu_total=B):
    timesteps = torch.randint(20, 980, (images.shape[0],))
    noise = torch.randn_like(images)
    ac = ALPHAS_CUMPROD[timesteps].reshape(-1, 1, 1, 1)
    noise_fake = fake_score(ac.sqrt() * images + (1 - ac).sqrt() * noise, timesteps.double())
    return ((noise_fake - noise) ** 2).sum().mul(ls / batch_gpu_total)


def lsg_denoiser(net):
    from diffusers import DDPMScheduler

    from sid.precond import Preconditioned
    from sid.teachers.diffusers.rules import DiscreteVPRule

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    rule = DiscreteVPRule(scheduler.alphas_cumprod, "epsilon")
    rule.log_sigmas = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD).sqrt().log()       # ā in float64, as the oracle's
    return Preconditioned(lambda x_in, c_noise, labels: net(x_in, c_noise), rule)


def lsg_loss(lam):
    cfg = load_config([], [f"loss.lam={lam}", "loss.weighting=sid", "loss.time=timesteps", "loss.fake_loss=native",
                           "loss.g_scale=1", "loss.fake_scale=1"])
    return DistillationLoss.from_config(cfg.loss, Teacher(lsg_denoiser(EpsNet(0)), SHAPE, {"kind": "diffusers"}),
                                        per_process=B)


@pytest.mark.parametrize("lam", [1.0, 1.2])
def test_the_sid_lsg_losses_are_the_official_ones_at_integer_timesteps(lam):
    """On a float64 ε-teacher at its own timesteps, both of sid's losses and their gradients equal SiD-LSG's to
    float64 rounding, and the networks are fed the integer timesteps."""
    true_net, fake_net = EpsNet(1).requires_grad_(False), EpsNet(2)
    x_official, x_ours = images(), images()
    torch.manual_seed(3)
    official = official_lsg_generator_loss(true_net, fake_net.requires_grad_(False), x_official, alpha=lam)
    torch.manual_seed(3)
    loss = lsg_loss(lam)
    ours = loss.generator(lsg_denoiser(true_net), lsg_denoiser(fake_net), x_ours).sum()
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=0)
    (g_official,) = torch.autograd.grad(official, x_official)
    (g_ours,) = torch.autograd.grad(ours, x_ours)
    assert relative(g_ours, g_official) < 1e-12
    fed = torch.cat(true_net.fed)
    assert torch.equal(fed, fed.round()) and fed.min() >= 20 and fed.max() <= 979

    official_net, our_net = EpsNet(2), EpsNet(2)
    x = images().detach()
    torch.manual_seed(4)
    official = official_lsg_fake_score_loss(official_net, x)
    torch.manual_seed(4)
    ours = loss.fake_score(lsg_denoiser(our_net), x).sum()
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=0)
    official.backward()
    ours.backward()
    assert relative(our_net.a.grad, official_net.a.grad) < 1e-12


# DMD / VSD: the generator's gradient ω (f_ψ − f_φ) through x_g alone -------------------------------------------

def dmd_loss_of(**extra):
    cfg = load_config([], ["loss.kind=dmd", "loss.weighting=sid", "loss.t_max=0.8", *extra])
    teacher = Teacher(GaussianMixture([1.0], torch.zeros(1, *SHAPE), [0.5]), SHAPE, {"kind": "analytic"})
    return DistillationLoss.from_config(cfg.loss, teacher, per_process=B)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.2])
def test_dmd_is_the_identity_loss_with_both_outputs_detached_and_dmd2s_formula(lam):
    """loss.kind=dmd: its gradient w.r.t. x_g equals (a) DMD2's ½‖x_g − sg[x_g − ω(f_ψ − f_φ)]‖² (ω = 1 / mean
    |x_g − f_φ|, DMD's normalisation), written here from the paper, and (b) SiD's identity loss at any λ with both
    networks' outputs detached; the networks keep no graph, so their parameters get no gradient."""
    from sid.losses import generator_loss

    teacher, fake = Net(1), Net(2)
    x_ours, x_formula, x_sid = images(), images(), images()
    torch.manual_seed(3)
    ours = dmd_loss_of().generator(teacher, fake, x_ours).sum()
    (g_ours,) = torch.autograd.grad(ours, x_ours)
    assert all(p.grad is None for p in (*teacher.parameters(), *fake.parameters()))

    torch.manual_seed(3)                                        # the same σ and noise: drawn in the same order
    sigma = dmd_loss_of().generator_sigma(B, dtype=torch.float64)
    x_t = x_formula.detach() + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x_formula)
    with torch.no_grad():
        f_real, f_fake = teacher(x_t, sigma), fake(x_t, sigma)
        omega = 1 / (x_formula - f_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
    formula = 0.5 * ((x_formula - (x_formula - omega * (f_fake - f_real)).detach()) ** 2).sum() * 100 / B
    (g_formula,) = torch.autograd.grad(formula, x_formula)
    assert relative(g_ours, g_formula) < 1e-12

    def detached(net):
        return lambda x, s, c=None: net(x, s).detach()

    torch.manual_seed(3)
    sigma = dmd_loss_of().generator_sigma(B, dtype=torch.float64)
    sid = generator_loss(detached(teacher), detached(fake), x_sid, sigma, lam=lam).sum() * 100 / B
    (g_sid,) = torch.autograd.grad(sid, x_sid)
    assert relative(g_sid, g_formula) < 1e-12


def test_dmd_refuses_a_lambda_and_two_time_scales_update_the_fake_score_k_times(tmp_path):
    """λ has no meaning for DMD: asked for, one line; a preset's, set aside. optim.fake_updates=5 (DMD2) takes
    five fake-score steps per generator step, each on fresh generator samples."""
    from sid.errors import SidError
    from sid.trainer import train

    with pytest.raises(SidError, match="^loss.lam=1 has no meaning for loss.kind=dmd"):
        load_config([], ["loss.kind=dmd", "loss.lam=1"])
    assert load_config(["toy_2d"], ["loss.kind=dmd"]).loss.lam == "sid"         # a preset's λ is set aside
    with pytest.raises(SidError, match="loss.kind='gan' is invalid; choose one of"):
        load_config([], ["loss.kind=gan"])
    cfg = load_config([], ["loss.kind=dmd", "optim.fake_updates=5", "optim.batch=32", "train.total_nimg=64",
                           "teacher.analytic.student_width=16", "teacher.analytic.student_fit_steps=10",
                           "train.log_every_nimg=64", "train.sample_every_nimg=100000", "train.ckpt_every_nimg=64",
                           f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.tracker=none"])
    run = train(cfg)
    steps = {name: int(next(iter(opt.state.values()))["step"]) for name, opt in (("fake", run.opt_fake),
                                                                                  ("g", run.opt_g))}
    assert steps == {"fake": 10, "g": 2}
