"""SiDA (loss.kind=sida): its losses against a transcription of the official code, where its logit is read, its
schedule, and an exact resume with real images.

The oracle below is a transcription, written for this test, of ``SIDA_EDMLoss.generator_share_encoder_loss`` and
``SIDA_EDMLoss.fakescore_discriminator_share_encoder_loss`` in ``sida_training/sida_loss.py`` of
github.com/mingyuanzhou/SiD (branch ``sida``), with the reductions of ``sida_training/sida_training_loop.py``:
the fake step ``loss.sum() · ls / B + loss_D.sum() · ls_D / B``; the generator step ``½ loss.sum() · lsg / B +
½ loss_gan.sum() · lsg_gan / B`` where ``loss_gan`` is BCE(clamp(ℓ, ±10), 1) over the batch divided by the
per-sample weight, averaged over its singleton dimensions and multiplied by C·H·W. The logit ℓ is the channel mean
of the encoder's last output (``return_flag='encoder'``), which the oracle computes by calling the encoder
itself; sid catches it with a hook in the one forward it runs.

Both sides draw their random numbers in the same order (σ, then the noise). Networks and images are float64; as
in tests/test_official.py, the official weight is cast to float32 (a rounding below 6e-8) and the Karras formula's
two arrangements round differently in float32 σ (about 1e-7); the official discriminator term is float32 as well
(its float32 weight times a 0-dim float64 BCE stays float32 under torch's promotion), about 1e-7 of that term. So
losses and gradients must agree to 1e-6 relative, far below a changed constant, reduction, label or detach.
"""

import numpy as np
import pytest
import torch
from torch import nn

from sid.config import load_config
from sid.errors import SidError
from sid.losses import DistillationLoss, EncoderLogits
from sid.teachers import Teacher
from sid.teachers.analytic import GaussianMixture

B, SHAPE = 6, (3, 4, 4)
F64 = torch.float64


class EncoderDecoder(nn.Module):
    """A small denoiser with an EDM-style ``enc`` (a ModuleDict whose last block ends the encoder) and a decoder."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.ModuleDict({"conv": nn.Conv2d(3, 6, 3, padding=1), "down": nn.Conv2d(6, 6, 3, stride=2,
                                                                                           padding=1)}).to(F64)
        self.out = nn.ConvTranspose2d(6, 3, 2, stride=2).to(F64)

    def encode(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        return self.enc["down"](torch.nn.functional.silu(self.enc["conv"](x / (s**2 + 0.25).sqrt())) * (1 + s.log()))

    def forward(self, x, sigma, labels=None, augment_labels=None):
        s = sigma.reshape(-1, 1, 1, 1)
        return x * 0.25 / (s**2 + 0.25) + s * self.out(torch.tanh(self.encode(x, sigma)))


def logit(net, x, sigma):
    """``return_flag='encoder'``: the channel mean of the encoder's last output."""
    return net.encode(x, sigma).mean(dim=1, keepdim=True)


def bce(logits, target):
    return nn.BCEWithLogitsLoss()(logits, torch.full_like(logits, target))


def official_fake_step(fake_score, images, real_images, P_mean=-1.2, P_std=1.2, sigma_data=0.5, ls=1.0, ls_D=1.0):
    rnd_normal = torch.randn([images.shape[0], 1, 1, 1])
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    y = images
    n = torch.randn_like(y) * sigma
    y_fake, logit_fake = fake_score(y + n, sigma.flatten()), logit(fake_score, y + n, sigma.flatten())
    logit_real = logit(fake_score, real_images + n, sigma.flatten())
    loss_fake_score = weight * ((y_fake - y) ** 2)
    loss_D = weight * (bce(logit_real, 1.0) + bce(logit_fake, 0.0)) / 2
    return loss_fake_score.sum() * ls / B + loss_D.sum() * ls_D / B


def official_generator_step(true_score, fake_score, images, alpha, tmax=800, lsg=100.0, lsg_gan=0.01):
    sigma_min, sigma_max, rho = 0.002, 80, 7.0
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    rnd_t = torch.rand([images.shape[0], 1, 1, 1]) * tmax / 1000
    sigma = (max_inv_rho + (1 - rnd_t) * (min_inv_rho - max_inv_rho)) ** rho
    y = images
    n = torch.randn_like(y) * sigma
    y_real = true_score(y + n, sigma.flatten())
    y_fake, y_D = fake_score(y + n, sigma.flatten()), logit(fake_score, y + n, sigma.flatten())
    with torch.no_grad():
        weight_factor = abs(y - y_real).to(torch.float32).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
    loss = (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / weight_factor
    loss_gan = bce(y_D.clamp(-10, 10), 1.0) / weight_factor
    loss_gan = loss_gan.mean(dim=[1, 2, 3], keepdim=True) * y.shape[1] * y.shape[2] * y.shape[3]
    return 0.5 * loss.sum() * lsg / B + 0.5 * loss_gan.sum() * lsg_gan / B


def sida_loss(*extra) -> DistillationLoss:
    cfg = load_config([], ["loss.kind=sida", "data.source=teacher", *extra])
    teacher = Teacher(GaussianMixture([1.0], torch.zeros(1, *SHAPE), [0.5]), SHAPE, {"kind": "analytic"})
    return DistillationLoss.from_config(cfg.loss, teacher, per_process=B)


def relative(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def images(seed):
    return (torch.rand(B, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 - 1)


def test_the_fake_step_is_sidas_denoising_and_discriminator_loss():
    """The fake score's loss and its parameters' gradient equal the official fake step's: the denoising loss and
    c_D λ_EDM(σ) ½[BCE(ℓ(x_real + σn), 1) + BCE(ℓ(x_g + σn), 0)], the same σ and n for real and generated."""
    ours_net, official_net = EncoderDecoder(0), EncoderDecoder(0)
    x_g, x_real = images(1), images(2)
    torch.manual_seed(5)
    official = official_fake_step(official_net, x_g, x_real, ls_D=0.5)
    torch.manual_seed(5)
    tap = EncoderLogits(Teacher.encoder_end(None, ours_net))
    ours = sida_loss("loss.d_scale=0.5").fake_score_adversarial(ours_net, tap.logits, x_g, x_real).sum()
    assert relative(ours, official) < 1e-6
    official.backward()
    ours.backward()
    for a, b in zip(ours_net.parameters(), official_net.parameters()):
        assert relative(a.grad, b.grad) < 1e-6


@pytest.mark.parametrize("lam", [0.5, 1.2])
def test_the_generator_step_is_half_sid_and_half_the_encoder_gan_term(lam):
    """With its adversarial term on, the generator's loss and its gradient w.r.t. x_g equal the official
    ½ c_G ℓ_SiD + ½ c_GAN ω BCE(clamp(ℓ(x_t), ±10), 1) · CHW."""
    teacher, fake = EncoderDecoder(1), EncoderDecoder(2)
    with torch.no_grad():                               # logits past ±10 for some samples: the clamp takes part
        fake.enc["down"].weight *= 60
        fake.enc["down"].bias -= 10
        assert logit(fake, images(3), torch.full((B,), 0.5, dtype=F64)).abs().max() > 10
    x_ours, x_official = images(3).requires_grad_(), images(3).requires_grad_()
    torch.manual_seed(7)
    official = official_generator_step(teacher, fake, x_official, lam)
    torch.manual_seed(7)
    tap = EncoderLogits(Teacher.encoder_end(None, fake))
    ours = sida_loss(f"loss.lam={lam}").generator(teacher, fake, x_ours, None, tap.logits).sum()
    assert relative(ours, official) < 1e-6
    (g_ours,) = torch.autograd.grad(ours, x_ours)
    (g_official,) = torch.autograd.grad(official, x_official)
    # The official GAN branch runs in float32 (BCE / float32 weight), forward and backward; its gradient partly
    # cancels the SiD term's here, which lifts its float32 rounding to ~2e-6 of the total (dropping the clamp: 5e-3).
    assert relative(g_ours, g_official) < 1e-5


def test_the_logit_is_read_from_each_familys_encoder_in_the_fake_scores_own_forward(tiny_unet_overrides):
    """Teacher.encoder_end: a diffusers UNet's last down block (also inside a LoRA student, whose containers are its
    own), EDM's last ``enc`` block, an MLP's middle layer; the hook catches the fake score's forward, not the
    teacher's, and its channel mean is the logit."""
    from diffusers import UNet2DModel

    from sid.config import load_config as load
    from sid.lora import lora_student
    from sid.networks import MLP
    from sid.teachers import build_teacher

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    assert Teacher.encoder_end(None, unet) is unet.down_blocks[-1]
    net = EncoderDecoder(0)
    assert Teacher.encoder_end(None, net) is net.enc["down"]
    mlp = MLP((2,), width=8, depth=3)
    assert Teacher.encoder_end(None, mlp) is mlp.body[3]                    # the second of three hidden layers

    cfg = load([], tiny_unet_overrides + ["lora.targets=[conv1,conv2]"])
    teacher = build_teacher(cfg.teacher)
    fake = lora_student(teacher, cfg.lora)
    block = teacher.encoder_end(fake)
    assert block is not teacher.encoder_end(teacher.denoiser)
    seen = []
    block.register_forward_hook(lambda m, i, out: seen.append(out[0]))
    tap = EncoderLogits(block)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    fake(x, sigma)
    teacher.denoiser(x, sigma)
    assert len(seen) == 1 and torch.equal(tap.logits(), seen[0].mean(1, keepdim=True))
    with pytest.raises(SidError, match="read before the fake score ran"):
        tap.logits()


def test_sida_waits_for_the_fake_score_then_for_its_gan_and_clips_the_fake_gradients(tmp_path):
    """The generator takes no step before loss.g_start_nimg and its adversarial term starts at gan_start_nimg; the
    fake score's gradients are clipped at 1 (SiDA's code); what SiDA cannot use is one line."""
    from sid import trainer
    from sid.trainer import fake_clip, train

    calls = []
    original = trainer.generator_micro_loss
    monkey = pytest.MonkeyPatch()
    monkey.setattr(trainer, "generator_micro_loss", lambda run, first, r: (calls.append(run.nimg), original(
        run, first, r))[1])
    base = ["loss.kind=sida", "data.source=teacher", "optim.batch=16", "train.total_nimg=64",
            "teacher.analytic.student_width=16", "teacher.analytic.student_fit_steps=10", "train.log_every_nimg=64",
            "train.sample_every_nimg=100000", "train.ckpt_every_nimg=64", f"train.run_dir={tmp_path / 'run'}",
            "train.progress=false", "train.tracker=none", "loss.g_start_nimg=32", "loss.gan_start_nimg=48"]
    try:
        run = train(load_config([], base))
    finally:
        monkey.undo()
    assert calls == [32, 48]
    assert [int(next(iter(o.state.values()))["step"]) for o in (run.opt_fake, run.opt_g)] == [4, 2]
    assert fake_clip(run.cfg) == 1.0 and fake_clip(load_config([], [])) is None
    assert fake_clip(load_config([], base + ["optim.fake_clip=0.5"])) == 0.5
    for extra, message in ((["data.source=null"], "loss.kind=sida reads real images: set data.source"),
                           (["loss.kind=sid"], "data.source is read by loss.kind=sida only"),
                           (["loss.guide_fake=2"], "leave loss.guide_fake_train and loss.guide_fake at 1"),
                           (["loss.reuse_generator_batch=true"], "set loss.reuse_generator_batch=false")):
        with pytest.raises(SidError, match=message):
            load_config([], base + extra)


def test_a_sida_run_with_real_images_resumes_bit_identically(tmp_path, tiny_unet_overrides):
    """SiDA on a diffusers UNet teacher with real images from an .npz, stopped at 16 images (after the generator
    and the GAN term have started) and resumed to 32, ends as the uninterrupted run: the real images' position is
    training state."""
    from conftest import assert_resumed_exactly, assert_trained
    from sid.trainer import train

    data = tmp_path / "real.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8))
    sida = ["loss.kind=sida", f"data.source={data}", "data.xflip=true", "loss.g_start_nimg=8",
            "loss.gan_start_nimg=8", "train.sample_every_nimg=1000", "train.tracker=none"]

    def config(name, total):
        return load_config([], tiny_unet_overrides + sida + [f"train.run_dir={tmp_path / name}",
                                                              f"train.total_nimg={total}"])

    whole = train(config("whole", 32))
    train(config("split", 16))
    resumed = train(config("split", 32), resume="auto")
    assert_resumed_exactly(whole, resumed)
    assert_trained(whole)
    assert resumed.real.state_dict() == whole.real.state_dict() == {"drawn": 32}


def test_sid2a_starts_the_generator_and_its_ema_from_a_sid_run(tmp_path):
    """generator.init: the generator and its EMA start as a SiD run's exported generator (the fake score as the
    teacher); before loss.g_start_nimg they stay exactly it. Another architecture is one line."""
    from sid.generator import load_generator
    from sid.trainer import train

    small = ["optim.batch=16", "teacher.analytic.student_width=16", "teacher.analytic.student_fit_steps=10",
             "train.log_every_nimg=32", "train.sample_every_nimg=100000", "train.ckpt_every_nimg=32",
             "train.progress=false", "train.tracker=none", "train.total_nimg=32"]
    train(load_config([], small + [f"train.run_dir={tmp_path / 'sid'}"]))
    start = load_generator(tmp_path / "sid").denoiser.state_dict()
    run = train(load_config([], small + ["loss.kind=sida", "data.source=teacher", f"generator.init={tmp_path / 'sid'}",
                                         f"train.run_dir={tmp_path / 'sida'}"]))
    for net in (run.generator.denoiser, run.ema.model.denoiser):
        assert all(torch.equal(v, start[k]) for k, v in net.state_dict().items())
    with pytest.raises(SidError, match="a generator of another architecture"):
        train(load_config([], small + [f"generator.init={tmp_path / 'sid'}", "teacher.analytic.student_width=8",
                                       f"train.run_dir={tmp_path / 'other'}"]))
