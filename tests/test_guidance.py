"""Classifier-free guidance inside the loss (sid/guidance.py, SiD-LSG's four scales) and conditions that the
losses pass through without looking inside."""

import pytest
import torch
from torch import nn

from conftest import assert_float32_close
from sid.config import load_config
from sid.errors import SidError
from sid.guidance import concat, drop, guided, where
from sid.losses import DistillationLoss
from sid.precond import EDMRule, Preconditioned
from sid.teachers.base import Teacher
from sid.teachers.diffusers.rules import DiscreteVPRule


class Conditioned(nn.Module):
    """F(x_in, c_noise, labels): a small network whose output depends on the label (and records its batches)."""

    def __init__(self, classes=3):
        super().__init__()
        self.body = nn.Conv2d(1, 1, 3, padding=1)
        self.embed = nn.Linear(classes, 1)
        self.batches = []

    def forward(self, x_in, c_noise, labels):
        self.batches.append(len(x_in))
        return self.body(x_in) * (1 + self.embed(labels)[:, :, None, None]) + c_noise[:, None, None, None]


def teacher(classes=3):
    torch.manual_seed(0)
    return Teacher(Preconditioned(Conditioned(classes), EDMRule(0.5, 0.002, 80.0), label_dim=classes), (1, 4, 4),
                   {"kind": "python"}, zero_label_is_null=True)


def labels(n, classes=3):
    return nn.functional.one_hot(torch.arange(n) % classes, classes).float()


def test_guidance_is_cfg_on_the_denoiser_in_one_batched_forward():
    t = teacher()
    x, sigma, c = torch.randn(4, 1, 4, 4), torch.full((4,), 1.3), labels(4)
    assert guided(t.denoiser, 1.0, t.null_condition) is t.denoiser                 # κ = 1: the same function
    t.denoiser.net.batches.clear()
    out = guided(t.denoiser, 2.5, t.null_condition)(x, sigma, c)
    assert t.denoiser.net.batches == [8]                                           # both halves, one batch
    d_c, d_u = t.denoiser(x, sigma, c), t.denoiser(x, sigma, torch.zeros(4, 3))
    assert_float32_close(out, d_u + 2.5 * (d_c - d_u))                            # batches of 8 and of 4


def test_guidance_on_epsilon_is_guidance_on_the_denoiser():
    """sid-math §1.3: D is affine in the network's output, so the pipelines' CFG on ε equals CFG on D."""
    rule = DiscreteVPRule(torch.linspace(0.9999, 0.01, 1000).double().cumprod(0).clamp_min(1e-6), "epsilon")
    net = Conditioned()
    denoiser = Preconditioned(net, rule, label_dim=3)
    x, sigma, c, kappa = torch.randn(2, 1, 4, 4), torch.tensor([0.7, 3.0]), labels(2), 4.0
    coefficients = rule(sigma.reshape(-1, 1, 1, 1))
    x_in, t = coefficients.c_in * x, coefficients.c_noise.flatten()
    eps = net(x_in, t, torch.zeros(2, 3)) + kappa * (net(x_in, t, c) - net(x_in, t, torch.zeros(2, 3)))
    assert_float32_close(guided(denoiser, kappa, lambda n: torch.zeros(n, 3))(x, sigma, c),   # one batch of 4
                         x - sigma.reshape(-1, 1, 1, 1) * eps)


def test_conditions_of_any_structure_batch_and_select():
    a = {"text": torch.ones(2, 5, 8), "pooled": torch.ones(2, 8)}
    b = {"text": torch.zeros(2, 5, 8), "pooled": torch.zeros(2, 8)}
    both = concat(a, b)
    assert both["text"].shape == (4, 5, 8) and both["pooled"][2:].eq(0).all()
    mixed = where(torch.tensor([True, False]), a, b)
    assert mixed["text"][0].eq(1).all() and mixed["text"][1].eq(0).all() and mixed["pooled"][1].eq(0).all()
    assert concat(None, None) is None and drop(None, 0.5, lambda n: None) is None


def test_the_drop_rate_is_the_stated_one():
    null = lambda n: torch.zeros(n, 3)                                                       # noqa: E731
    kept = drop(labels(100_000), 0.1, null, torch.Generator().manual_seed(0)).sum(1)
    assert abs(1 - kept.mean().item() - 0.1) < 0.004
    assert drop(labels(10), 0.0, null) is not None and drop(labels(10), 0.0, null).sum() == 10


def loss_with(**scales):
    cfg = load_config([], [f"loss.{k}={v}" for k, v in scales.items()])
    return DistillationLoss.from_config(cfg.loss, teacher_, per_process=4)


teacher_ = teacher()


@pytest.mark.parametrize("scale, place", [("guide_fake_train", "fake step: fake score"),
                                          ("guide_fake", "generator step: fake score"),
                                          ("guide_teacher", "generator step: teacher")])
def test_each_scale_reaches_its_own_place_and_no_other(scale, place):
    """One scale ≠ 1 at a time: only its network, in its step, runs the doubled (guided) batch."""
    fake, real = teacher(), teacher()
    loss, x_g, c = loss_with(**{scale: 2.0}), torch.randn(4, 1, 4, 4), labels(4)
    seen = {}
    for step, nets in (("fake step", {"fake score": fake}), ("generator step", {"fake score": fake, "teacher": real})):
        for net in nets.values():
            net.denoiser.net.batches.clear()
        if step == "fake step":
            loss.fake_score(fake.denoiser, x_g, c)
        else:
            loss.generator(real.denoiser, fake.denoiser, x_g, c)
        seen.update({f"{step}: {name}": net.denoiser.net.batches[-1] for name, net in nets.items()})
    assert {k: v for k, v in seen.items() if v == 8} == {place: 8} and set(seen.values()) == {4, 8}


def test_conditions_are_dropped_only_in_the_fake_step_and_only_with_guidance_there():
    assert loss_with().drop_cond == 0 and loss_with(guide_teacher=2.0).drop_cond == 0
    assert loss_with(guide_fake=1.5).drop_cond == 0.1
    assert loss_with(guide_fake_train=1.5, drop_cond=0.3).drop_cond == 0.3
    c = labels(64)
    assert loss_with(guide_teacher=2.0).fake_conditions(c) is c
    torch.manual_seed(0)
    loss = loss_with(guide_fake=1.5, drop_cond=0.5)
    assert 0.3 < 1 - loss.fake_conditions(c).sum(1).mean().item() < 0.7          # about half dropped
    fake = teacher()
    seen = []
    original = fake.denoiser.net.forward
    fake.denoiser.net.forward = lambda x, t, c: seen.append(c.sum(1)) or original(x, t, c)
    loss.generator(teacher().denoiser, fake.denoiser, torch.randn(64, 1, 4, 4), c)
    assert seen[-1][:64].eq(1).all() and seen[-1][64:].eq(0).all()                 # conditional half kept whole


def test_the_fake_step_draws_its_samples_with_the_conditions_the_fake_score_sees():
    """SiD-LSG drops prompts before the generator draws the fake step's samples: G and f_ψ see the same
    conditions, null where dropped."""
    from types import SimpleNamespace

    from sid.conditions import ClassLabels
    from sid.trainer import fake_score_micro_loss

    seen = {}

    class Generator:
        shape = (1, 4, 4)

        def __call__(self, z, c, first=None):
            seen["generator"] = c
            return torch.randn(len(z), 1, 4, 4)

    loss = loss_with(guide_fake=1.5, drop_cond=0.5)
    loss = SimpleNamespace(fake_conditions=loss.fake_conditions,
                           fake_score=lambda net, x, c: seen.setdefault("fake score", c).sum(1))
    run = SimpleNamespace(generator=Generator(), batch_gpu=64, loss=loss, fake_ddp=None, conditions=ClassLabels(3),
                          accelerator=SimpleNamespace(device=torch.device("cpu")), real=None)
    torch.manual_seed(1)
    fake_score_micro_loss(run, None, None, 0)
    assert seen["generator"] is seen["fake score"]
    assert 0.3 < 1 - seen["generator"].sum(1).mean().item() < 0.7


def test_guidance_on_an_unconditional_teacher_is_one_line():
    plain = Teacher(Preconditioned(nn.Identity(), EDMRule(0.5, 0.002, 80.0)), (1, 4, 4), {"kind": "analytic"})
    cfg = load_config([], ["loss.guide_teacher=1.5"]).loss
    with pytest.raises(SidError, match="loss.guide_teacher=1.5: guidance needs a conditional teacher.*unconditional"):
        DistillationLoss.from_config(cfg, plain, per_process=4)
    classes = teacher()
    classes.zero_label_is_null = False                    # a class-embedding UNet: every index is some class
    with pytest.raises(SidError, match="python teacher has no null condition"):
        DistillationLoss.from_config(cfg, classes, per_process=4)
    with pytest.raises(SidError, match=r"loss.guide_fake=-1.0 is out of range: it must be in \[0, 100\]"):
        load_config([], ["loss.guide_fake=-1"])
