"""teacher.kind=edm_pickle: networks stored with their source code (EDM's persistence format), read without EDM's
code. The pickles are written as EDM writes them (tests/edm_pickles.py)."""

import pickle
import sys
from pathlib import Path

import pytest
import torch

from edm_pickles import Opaque, without_edm, write_snapshot
from sid.config import load_config
from sid.errors import SidError
from sid.generator import load_generator
from sid.teachers import build_teacher
from sid.teachers.edm_pickle import load_denoiser


@pytest.mark.parametrize("kind,label_dim", [("EDMPrecond", 0), ("VPPrecond", 3), ("VEPrecond", 0)])
def test_denoiser_equals_the_pickled_network(edm_side, tmp_path, monkeypatch, kind, label_dim):
    net = getattr(edm_side, kind)(8, 1, label_dim=label_dim)
    write_snapshot(tmp_path / "net.pkl", net)
    without_edm(monkeypatch)                                                          # a machine without EDM's code

    with pytest.raises(SidError, match="runs the code stored in the pickle.*--trust-code"):
        load_denoiser(tmp_path / "net.pkl", trust=False)
    denoiser, shape, spec = load_denoiser(tmp_path / "net.pkl", trust=True)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules          # nothing left behind
    assert shape == (1, 8, 8) and denoiser.label_dim == label_dim and spec["kind"] == "edm_pickle"
    assert (denoiser.sigma_min, denoiser.sigma_max) == ((0.002, 80.0) if kind != "VEPrecond" else (0.02, 80.0))

    sigma = torch.tensor([0.002, 0.05, 0.5, 2.5, 20.0, 80.0])
    x = torch.randn(6, 1, 8, 8) * (1 + sigma.view(-1, 1, 1, 1))
    labels = torch.nn.functional.one_hot(torch.arange(6) % 3, 3).float() if label_dim else None
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, sigma, labels), net(x, sigma, labels), rtol=1e-5, atol=1e-5)


def test_vp_noise_input_follows_the_continuous_schedule(edm_side, tmp_path, monkeypatch):
    """c_noise = (M - 1) t(σ) with t(σ) = (sqrt(β_min² + 2 β_d ln(1 + σ²)) - β_min) / β_d (sid-math.md §1.2)."""
    write_snapshot(tmp_path / "vp.pkl", edm_side.VPPrecond(8, 1))
    denoiser, _, _ = load_denoiser(tmp_path / "vp.pkl", trust=True)
    c = denoiser.rule(torch.tensor([2.5]))
    t = ((0.1**2 + 2 * 19.9 * torch.log1p(torch.tensor(2.5**2))).sqrt() - 0.1) / 19.9
    torch.testing.assert_close(c.c_noise, 999 * t.reshape(1))
    assert float(c.c_skip) == 1 and float(c.c_out) == -2.5


def test_every_parameter_of_an_augmented_network_takes_part(edm_side, tmp_path):
    """EDM's CIFAR-10 networks have augment labels; fed zeros (no augmentation, SiD's input), the augment layer
    still takes part, so DDP finds no unused parameters in the students, and the output is the network's."""
    net = edm_side.VPPrecond(8, 1, augment_dim=9)
    write_snapshot(tmp_path / "aug.pkl", net)
    denoiser, _, _ = load_denoiser(tmp_path / "aug.pkl", trust=True)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 5.0])
    denoiser(x, sigma).square().sum().backward()
    assert all(p.grad is not None for p in denoiser.parameters())
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, sigma), net(x, sigma), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_distil_an_edm_pickle_and_reload_its_generator(edm_side, tmp_path):
    write_snapshot(tmp_path / "net.pkl", edm_side.EDMPrecond(8, 1))
    overrides = ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={tmp_path / 'net.pkl'}",
                 "optim.batch=4", "train.total_nimg=8", "train.log_every_nimg=4",
                 f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.tracker=none",
                 "train.num_samples=4"]
    from sid.trainer import train

    run = train(load_config([], overrides), trust_code=True)
    assert run.nimg == 8 and (tmp_path / "run" / "samples" / "compare.png").is_file()
    with pytest.raises(SidError, match="rebuilt by unpickling .*trust_code=True"):     # never on the file's say
        load_generator(tmp_path / "run" / "generator")
    generator = load_generator(tmp_path / "run" / "generator", trust_code=True)
    torch.testing.assert_close(generator.sample_seeds(range(3)), run.ema.model.sample_seeds(range(3)))

    with open(tmp_path / "net.pkl", "ab") as f:
        f.write(b"\0")                                                              # not the trusted file any more
    with pytest.raises(SidError, match="missing or changed"):
        load_generator(tmp_path / "run" / "generator", trust_code=True)


@pytest.mark.slow
def test_a_class_conditional_pickle_distils_with_guidance_inside_the_loss(edm_side, tmp_path):
    """SiD-LSG's four guidance scales on a class-conditional EDM network (the zero one-hot vector its null class):
    the run trains and resumes bit-identically, prompt-style condition dropout included."""
    write_snapshot(tmp_path / "net.pkl", edm_side.EDMPrecond(8, 1, label_dim=3))
    overrides = ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={tmp_path / 'net.pkl'}", "optim.batch=4",
                 "train.log_every_nimg=4", "train.ckpt_every_nimg=8", "train.progress=false", "train.tracker=none",
                 "train.sample_every_nimg=1000", "loss.guide_fake_train=1.5", "loss.guide_fake=2",
                 "loss.guide_teacher=3", "loss.drop_cond=0.5"]
    from sid.trainer import train

    whole = train(load_config([], overrides + ["train.total_nimg=16", f"train.run_dir={tmp_path / 'whole'}"]),
                  trust_code=True)
    train(load_config([], overrides + ["train.total_nimg=8", f"train.run_dir={tmp_path / 'split'}"]), trust_code=True)
    split = train(load_config([], overrides + ["train.total_nimg=16", f"train.run_dir={tmp_path / 'split'}"]),
                  resume="auto", trust_code=True)
    assert whole.loss.guide_teacher == 3 and whole.loss.drop_cond == 0.5
    for a, b in zip(whole.generator.state_dict().values(), split.generator.state_dict().values()):
        assert torch.equal(a, b)


def test_a_url_is_downloaded_once_into_the_hub_folder(edm_side, tmp_path, monkeypatch):
    write_snapshot(tmp_path / "net.pkl", edm_side.EDMPrecond(8, 1))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    url = (tmp_path / "net.pkl").as_uri()                                            # file:// reads like https://
    _, _, spec = load_denoiser(url, trust=True)
    cached = Path(spec["path"])
    assert cached.name == "net.pkl" and cached.parent.parent == (tmp_path / "hub" / "sid").resolve()
    (tmp_path / "net.pkl").unlink()
    load_denoiser(url, trust=True)                                               # the cached copy
    with pytest.raises(SidError, match="cannot download"):                          # same name, another URL
        load_denoiser((tmp_path / "elsewhere" / "net.pkl").as_uri(), trust=True)


def test_bad_edm_pickles_are_one_clear_error(edm_side, tmp_path):
    def teacher(path):
        return build_teacher(load_config([], ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={path}"]).teacher,
                             trust_code=True)

    with pytest.raises(SidError, match="not found"):
        teacher(tmp_path / "none.pkl")
    with pytest.raises(SidError, match="is a folder.*teacher.kind=diffusers"):
        teacher(tmp_path)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(SidError, match="not a readable EDM pickle"):
        teacher(tmp_path / "junk.pkl")
    with pytest.raises(SidError, match="is a file.*teacher.kind=edm_pickle"):                # the other kind
        build_teacher(load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={tmp_path / 'junk.pkl'}"])
                      .teacher)
    with open(tmp_path / "dict.pkl", "wb") as f:
        pickle.dump({"augment_pipe": Opaque()}, f)
    with pytest.raises(SidError, match="holds no EDM network"):
        teacher(tmp_path / "dict.pkl")
    with open(tmp_path / "opaque.pkl", "wb") as f:
        pickle.dump({"ema": Opaque()}, f)
    with pytest.raises(SidError, match="AugmentPipe.*could not be rebuilt.*a_module_nobody_has"):
        teacher(tmp_path / "opaque.pkl")
    with pytest.raises(SidError, match="needs teacher.edm_pickle.path"):
        load_config([], ["teacher.kind=edm_pickle"])
