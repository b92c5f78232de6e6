"""The fake-score step's geometric augmentation (sid/augment.py): what each transform does to an image, the
distribution and layout of its 9 labels, and the wiring (augmented samples and their labels reach the fake
score in its own step only; teachers without augment labels are refused)."""

import math

import pytest
import torch

from conftest import sid_process
from sid.augment import LABEL_DIM, GeometricAugment, _matrices, _rotation, resample
from sid.config import load_config
from sid.errors import SidError

H = W = 32


def blob(n=2, x=3.0, y=-2.0, std=4.0):
    """A smooth Gaussian bump off the centre: transforms of it are known in closed form."""
    yy, xx = torch.meshgrid(torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij")
    return torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * std**2)).expand(n, 1, H, W).clone()


def moments(images):
    """Centre of mass (x, y) and mean squared radius about it, per image."""
    yy, xx = torch.meshgrid(torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij")
    m = images[:, 0] / images[:, 0].sum(dim=(1, 2), keepdim=True)
    cx, cy = (m * xx).sum((1, 2)), (m * yy).sum((1, 2))
    r2 = (m * ((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2)).sum((1, 2))
    return cx, cy, r2


def test_the_resampling_is_exact_for_the_identity_and_whole_pixel_shifts():
    x = blob()
    torch.testing.assert_close(resample(x, _matrices(2, "cpu")), x, atol=1e-6, rtol=0)        # perfect reconstruction
    shifted = resample(x, _matrices(2, "cpu", tx=-2.0, ty=1.0))                                # +2 px in x, -1 in y
    torch.testing.assert_close(shifted[..., 4:-4, 4:-4], x.roll((-1, 2), (2, 3))[..., 4:-4, 4:-4], atol=1e-6, rtol=0)
    flat = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(resample(flat, _rotation(torch.tensor([0.7, -2.0]))), flat, atol=1e-6, rtol=0)


def test_rotation_and_scaling_move_the_image_as_their_matrices_say():
    x = blob()
    turned = resample(x, _rotation(torch.full((2,), math.pi / 2)))
    torch.testing.assert_close(turned, x.rot90(1, (2, 3)), atol=0.02, rtol=0)                 # 90°, to filtering
    small = blob(x=2.0, y=-1.5, std=2.0)
    cx, cy, r2 = moments(resample(small, _matrices(2, "cpu", 1 / 1.5, 0.0, 0.0, 1 / 1.5)))  # scaled by 1.5
    assert torch.allclose(cx, torch.tensor(3.0), atol=0.05) and torch.allclose(cy, torch.tensor(-2.25), atol=0.05)
    assert torch.allclose(r2, torch.tensor(2 * 3.0**2), rtol=0.02)


def test_the_labels_describe_the_draw_with_the_official_rates():
    """x-flip a fair coin always; every other transform with probability p; each label zero when its
    transform was not drawn; the rotation's labels on the unit circle."""
    torch.manual_seed(0)
    n, p = 4000, 0.3
    _, labels = GeometricAugment(p)(torch.zeros(n, 1, 8, 8))
    assert labels.shape == (n, LABEL_DIM)
    drawn = labels != 0
    assert abs(float(drawn[:, 0].float().mean()) - 0.5) < 0.03                                # x-flip: ½
    assert abs(float(drawn[:, 1].float().mean()) - p / 2) < 0.03                              # y-flip: p × ½
    for columns in ([2], [3, 4], [7, 8]):                                                   # scale, rotation, shift
        assert abs(float(drawn[:, columns].any(1).float().mean()) - p) < 0.03
    assert abs(float(drawn[:, [5]].float().mean()) - p) < 0.03                                 # anisotropy
    torch.testing.assert_close((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, torch.ones(n))
    assert float(labels[:, 2][drawn[:, 2]].std()) == pytest.approx(1.0, abs=0.08)              # w ~ N(0, 1)
    same, labels = GeometricAugment(0.0)(blob())
    assert not labels.any() and labels.shape == (2, LABEL_DIM) and torch.equal(same, blob())


def test_a_flip_label_means_the_image_was_flipped():
    torch.manual_seed(1)
    x = torch.randn(64, 1, 8, 8)
    out, labels = GeometricAugment(1e-9)(x)                               # the x-flip's coin and nothing else
    flipped = labels[:, 0] == 1
    assert 0 < int(flipped.sum()) < 64
    torch.testing.assert_close(out[flipped], x[flipped].flip(3))
    torch.testing.assert_close(out[~flipped], x[~flipped])


def test_augmentation_reaches_the_fake_score_only_and_needs_augment_labels(edm_side, tmp_path, monkeypatch):
    """With loss.augment the fake-score step sees augmented samples and their (non-zero) labels; the generator
    step's networks get none (the backbone then takes zeros). A teacher without augment labels is refused."""
    from accelerate import Accelerator

    from edm_pickles import write_snapshot
    from sid.run import build
    from sid.trainer import iteration

    write_snapshot(tmp_path / "aug.pkl", edm_side.VPPrecond(8, 1, augment_dim=9))
    overrides = ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={tmp_path / 'aug.pkl'}", "loss.augment=0.5",
                 "optim.batch=8", f"train.run_dir={tmp_path}"]
    run = build(load_config([], overrides), Accelerator(cpu=True), resume=None, trust_code=True)
    seen = {"fake": [], "teacher": []}
    for name, net in (("fake", run.fake_score), ("teacher", run.teacher.denoiser)):
        net.net.register_forward_hook(lambda m, args, kwargs, out, name=name: seen[name].append(
            kwargs.get("augment_labels")), with_kwargs=True)
    iteration(run)
    fake_step, generator_step = seen["fake"][0], seen["fake"][1]
    assert fake_step.shape == (8, LABEL_DIM) and fake_step.abs().sum() > 0
    assert generator_step is None and seen["teacher"] == [None]
    with pytest.raises(SidError, match=r"loss.augment=0.5 needs a teacher whose network takes 9 augment labels"):
        build(load_config([], ["loss.augment=0.5", "teacher.analytic.student_fit_steps=1",
                               f"train.run_dir={tmp_path / 'b'}"]), Accelerator(cpu=True), resume=None)
    out = sid_process("train", "loss.augment=1.5", "--dry-run")
    assert out.returncode == 2 and "loss.augment=1.5 is out of range: it must be in [0, 1]" in out.stderr


def test_the_dropout_of_an_edm_network_is_set_as_the_official_run_sets_it(edm_side, tmp_path):
    from edm_pickles import write_snapshot
    from sid.teachers import build_teacher

    write_snapshot(tmp_path / "net.pkl", edm_side.EDMPrecond(8, 1))
    base = ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={tmp_path / 'net.pkl'}"]
    as_pickled = build_teacher(load_config([], base).teacher, trust_code=True)
    assert as_pickled.denoiser.net.model.block.dropout == 0.1
    teacher = build_teacher(load_config([], base + ["teacher.edm_pickle.dropout=0.13"]).teacher, trust_code=True)
    assert teacher.make_student().net.model.block.dropout == 0.13 and teacher.spec["dropout"] == 0.13
    with pytest.raises(SidError, match=r"teacher.edm_pickle.dropout=1.0 is out of range: it must be in \[0, 1\)"):
        load_config([], base + ["teacher.edm_pickle.dropout=1.0"])
