"""End-to-end distillation of an exact 3-mode Gaussian-mixture teacher (unequal weights) in 2-D.

After a fixed image budget per preset, fgm (λ = ½) and lambda1 (λ = 1) must reproduce the mixture: mode
weights within a few percent and a sliced Wasserstein distance well below the teacher-initialised
generator's. The sid preset (λ = 1.2) must at least improve. The fgm run with the loss sign flipped must
end farther from the mixture than it started. Budgets (measured, in-loop SWD every 32k images): fgm matches
from 384k images, lambda1 from about 512k (768k leaves a margin); sid had cut the distance 3.7x by 131k
(0.19 from 0.71); with the sign flipped the distance was 1.27-1.31 from 32k on, where fgm was at 0.17-0.25.
fgm runs with the σ-only weight (``x0``), the setting in which λ = ½ is the exact gradient (docs/losses.md);
with SiD's per-sample ω it keeps a bias of about 6 points toward the heavy mode at this budget.
"""

import pytest
import torch

from sid.config import load_config
from sid.generator import OneStepGenerator
from sid.metrics import mode_weights, sliced_wasserstein
from sid.teachers import build_teacher
from sid.trainer import train

pytestmark = pytest.mark.slow
WEIGHTS = [0.5, 0.3, 0.2]
BUDGET = {"fgm": 512_000, "lambda1": 768_000, "sid": 128_000}     # images seen per preset


def overrides(tmp_path, lam):
    weighting = "x0" if lam == "fgm" else "sid"
    return [f"loss.lam={lam}", f"loss.weighting={weighting}", "teacher.analytic.modes=3",
            "teacher.analytic.mode_std=0.3", f"teacher.analytic.weights={WEIGHTS}",
            "teacher.analytic.student_width=64", f"train.total_nimg={BUDGET[lam]}",
            "train.log_every_nimg=102400", "train.sample_every_nimg=1000000000", "train.ckpt_every_nimg=1000000000",
            f"train.run_dir={tmp_path / lam}", "train.progress=false", "train.tracker=none"]


def evaluate(generator, mixture):
    """(mode weights among samples near a mode, fraction near no mode, SWD to fresh teacher samples)."""
    x = generator.sample_seeds(range(4000))
    w = mode_weights(mixture, x)
    reference = mixture.sample(4000, torch.Generator().manual_seed(1))
    return w[:-1] / w[:-1].sum(), float(w[-1]), sliced_wasserstein(x, reference)


def matches(result, swd_init):
    weights, outside, swd = result
    return bool((weights - torch.tensor(WEIGHTS, dtype=weights.dtype)).abs().max() < 0.05
                and outside < 0.15 and swd < 0.3 * swd_init)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    cfg = load_config(["toy_2d"], overrides(tmp_path_factory.mktemp("init"), "fgm"))
    teacher = build_teacher(cfg.teacher)
    torch.manual_seed(cfg.train.seed)
    g0 = OneStepGenerator(teacher.make_student(), teacher.shape, cfg.generator.sigma_init).eval()
    return cfg, teacher.denoiser, evaluate(g0, teacher.denoiser)[2]


def distil(tmp_path, lam, mixture, *extra):
    run = train(load_config(["toy_2d"], overrides(tmp_path, lam) + list(extra)))
    return evaluate(run.ema.model, mixture)


@pytest.mark.parametrize("lam", ["fgm", "lambda1"])
def test_exact_presets_reproduce_the_mixture(tmp_path, baseline, lam):
    _, mixture, swd_init = baseline
    result = distil(tmp_path, lam, mixture)
    assert matches(result, swd_init), (result, swd_init)


def test_sid_preset_improves(tmp_path, baseline):
    _, mixture, swd_init = baseline
    weights, outside, swd = distil(tmp_path, "sid", mixture)
    assert swd < 0.5 * swd_init, (swd, swd_init)


def test_flipped_sign_fails_the_check(tmp_path, baseline, monkeypatch):
    import sid.losses

    real = sid.losses.generator_loss
    monkeypatch.setattr(sid.losses, "generator_loss", lambda *a, **k: -real(*a, **k))
    _, mixture, swd_init = baseline
    result = distil(tmp_path, "fgm", mixture, "train.total_nimg=64000")
    assert not matches(result, swd_init) and result[2] > swd_init, (result, swd_init)
