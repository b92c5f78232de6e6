"""The generator's EMA by half-life in images, with ramp-up (sid/ema.py)."""

import pytest
import torch

from sid.ema import EMA, ema_beta


def test_ema_beta_matches_sid():
    """β = 0.5^(batch / min(halflife, 0.05 cur_nimg)), as SiD's training loop computes it."""
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


def test_the_ramp_up_counts_the_images_before_each_step_as_the_official_loop():
    """SiD's loop (training/sid_training_loop.py) updates the EMA before it adds the step's images to cur_nimg:
    halflife = min(H, 0.05 × images before the step). By hand, batch 100, H = 1000: β = 0 at the first step
    (the EMA copies the weights), 0.5^(100/5) at the second, 0.5^(100/10) at the third."""
    net = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(net, halflife_nimg=1000, rampup=0.05)
    weights, averaged = [3.0, 5.0, 11.0], []
    for step, value in enumerate(weights):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net, cur_nimg=100 * step, batch=100)                           # the count before the step
        averaged.append(float(ema.model.weight))
    b1, b2 = 0.5 ** (100 / 5), 0.5 ** (100 / 10)
    expected = [3.0, b1 * 3.0 + (1 - b1) * 5.0]
    expected.append(b2 * expected[1] + (1 - b2) * 11.0)
    assert averaged == pytest.approx(expected, rel=1e-6)


def test_the_trainer_updates_the_ema_with_the_count_before_each_iteration(tmp_path):
    from accelerate import Accelerator

    from sid.config import load_config
    from sid.run import build
    from sid.trainer import iteration

    cfg = load_config([], ["teacher.analytic.student_width=16", "teacher.analytic.student_fit_steps=5",
                           "optim.batch=64", "optim.g_lr=1e-2", "ema.halflife_nimg=1000", "ema.rampup=0.5",
                           f"train.run_dir={tmp_path}"])
    run = build(cfg, Accelerator(cpu=True), resume=None)
    expected = [p.detach().clone() for p in run.ema.model.parameters()]
    for step in range(3):
        iteration(run)
        beta = ema_beta(64, 64 * step, 1000, 0.5)                               # 0, ¼, ½
        expected = [beta * e + (1 - beta) * p.detach() for e, p in zip(expected, run.generator.parameters())]
    for e, p in zip(expected, run.ema.model.parameters()):
        torch.testing.assert_close(p, e)
    assert run.nimg == 192
