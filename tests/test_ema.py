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


def test_several_emas_are_kept_exported_evaluated_and_resumed_exactly(tmp_path):
    """ema.halflife_nimg=[500, 2000]: both EMAs are training state (a run stopped at 256 images and resumed to 512
    ends bit-identical to an uninterrupted one), each is exported (the first as generator/, the second as
    generator-ema-2000/) and measured in-loop, and generator-best/ is the best value of either. A one-value list is
    the single EMA, bit for bit."""
    import json

    from conftest import assert_resumed_exactly
    from sid.config import load_config
    from sid.generator import load_generator
    from sid.trainer import train

    def config(name, total, halflife="[500,2000]"):
        return load_config([], ["teacher.analytic.student_width=32", "teacher.analytic.student_fit_steps=20",
                                "optim.batch=64", f"train.total_nimg={total}", "train.log_every_nimg=128",
                                "train.sample_every_nimg=100000", "train.ckpt_every_nimg=256", "eval.every_nimg=128",
                                "eval.num=256", f"train.run_dir={tmp_path / name}", "train.progress=false",
                                "train.tracker=none", f"ema.halflife_nimg={halflife}", "ema.rampup=100"])

    whole = train(config("whole", 512))
    train(config("split", 256))
    resumed = train(config("split", 512), resume="auto")
    assert_resumed_exactly(whole, resumed)
    (a,), (b,) = whole.more_emas, resumed.more_emas
    assert a.halflife_nimg == 2000 and all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                                               b.model.state_dict().values()))
    assert not torch.equal(*(next(e.model.parameters()) for e in whole.emas))      # two different averages
    folder = tmp_path / "whole"
    for export, ema in (("generator", whole.ema), ("generator-ema-2000", a)):
        loaded = load_generator(folder / export)
        assert all(torch.equal(x, y.cpu()) for x, y in zip(loaded.denoiser.state_dict().values(),
                                                            ema.model.denoiser.state_dict().values()))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    values = [r[k] for r in records for k in ("swd", "swd_ema-2000") if k in r]
    assert len(values) == 8
    best = json.loads((folder / "generator-best" / "generator.json").read_text())
    assert best["swd"] == min(values) and best.get("ema_halflife_nimg", 500) in (500, 2000)

    single, listed = train(config("single", 128, "500")), train(config("listed", 128, "[500]"))
    assert not listed.more_emas
    assert all(torch.equal(x, y) for x, y in zip(single.ema.model.state_dict().values(),
                                                  listed.ema.model.state_dict().values()))
