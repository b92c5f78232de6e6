"""EDM pickles: networks stored with their source code (EDM's persistence format), read without EDM's code.

The pickles here are written the way EDM writes them: every network object as a call of
``torch_utils.persistence._reconstruct_persistent_obj`` with its module's source, class name and state.
The source is a tiny stand-in for EDM's ``training/networks.py``: the three preconditioners around one
backbone with EDM's call signature, their coefficients written out as in EDM's Table 1.
"""

import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from sid.config import load_config
from sid.errors import SidError
from sid.generator import load_generator
from sid.teachers import build_teacher
from sid.teachers.edm_pickle import load_edm_denoiser

NETWORKS_SOURCE = '''
import numpy as np
import torch
from torch_utils import persistence


@persistence.persistent_class
class TinyUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, channels=8):
        super().__init__()
        self.emb = torch.nn.Linear(2, channels)
        self.map_label = torch.nn.Linear(label_dim, channels) if label_dim else None
        self.map_augment = torch.nn.Linear(augment_dim, channels, bias=False) if augment_dim else None
        self.conv0 = torch.nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.emb(torch.stack([noise_labels.cos(), (noise_labels / 100).sin()], dim=1))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return self.conv1(torch.nn.functional.silu(self.conv0(x) + emb[:, :, None, None]))


class _Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, augment_dim=0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.model = TinyUNet(img_resolution, img_channels, img_channels, label_dim, augment_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        labels = None if self.label_dim == 0 else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), labels).to(torch.float32)


@persistence.persistent_class
class EDMPrecond(_Precond):
    def __init__(self, *args, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        s2, d2 = sigma ** 2, self.sigma_data ** 2
        return d2 / (s2 + d2), sigma * self.sigma_data / (s2 + d2).sqrt(), 1 / (d2 + s2).sqrt(), sigma.log() / 4


@persistence.persistent_class
class VPPrecond(_Precond):
    def __init__(self, *args, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min, self.sigma_max = float(self.sigma(epsilon_t)), float(self.sigma(1))

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


@persistence.persistent_class
class VEPrecond(_Precond):
    def __init__(self, *args, sigma_min=0.02, sigma_max=100, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()
'''


def _reconstruct_persistent_obj(meta):                # what the pickle refers to; never called on this side
    raise AssertionError


class EasyDict(dict):
    pass


class Opaque:
    """A pickled object whose code cannot run elsewhere (EDM snapshots also hold an augmentation pipe)."""

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src="import a_module_nobody_has\n", class_name="AugmentPipe",
                    state={})
        return _reconstruct_persistent_obj, (meta,)


@pytest.fixture
def edm_side(monkeypatch):
    """EDM's side: its modules as its pickles name them, and networks built from NETWORKS_SOURCE."""
    persistence = types.ModuleType("torch_utils.persistence")

    def persistent_class(cls):
        def reduce(self):
            meta = dict(type="class", version=6, module_src=NETWORKS_SOURCE, class_name=cls.__name__,
                        state=self.__getstate__())
            return _reconstruct_persistent_obj, (meta,)

        cls.__reduce__ = reduce
        return cls

    persistence.persistent_class = persistent_class
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.util = util
    for name, module in {"torch_utils": package, "torch_utils.persistence": persistence, "dnnlib": dnnlib,
                         "dnnlib.util": util}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(_reconstruct_persistent_obj, "__module__", "torch_utils.persistence")
    monkeypatch.setattr(EasyDict, "__module__", "dnnlib.util")
    networks = types.ModuleType("edm_networks")
    exec(NETWORKS_SOURCE, networks.__dict__)
    return networks


def write_snapshot(path, net):
    """An EDM training snapshot: the network under 'ema', next to objects the loader must get past."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with open(path, "wb") as f:
        pickle.dump({"ema": net.eval(), "loss_fn": None, "augment_pipe": Opaque(),
                     "dataset_kwargs": EasyDict(resolution=8)}, f)


@pytest.mark.parametrize("kind,label_dim", [("EDMPrecond", 0), ("VPPrecond", 3), ("VEPrecond", 0)])
def test_denoiser_equals_the_pickled_network(edm_side, tmp_path, monkeypatch, kind, label_dim):
    net = getattr(edm_side, kind)(8, 1, label_dim=label_dim)
    write_snapshot(tmp_path / "net.pkl", net)
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):   # a machine without EDM's code
        monkeypatch.delitem(sys.modules, name)

    with pytest.raises(SidError, match="runs the code stored in the pickle.*trust=true"):
        load_edm_denoiser(tmp_path / "net.pkl", trust=False)
    denoiser, shape, spec = load_edm_denoiser(tmp_path / "net.pkl", trust=True)
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
    denoiser, _, _ = load_edm_denoiser(tmp_path / "vp.pkl", trust=True)
    c = denoiser.precond(torch.tensor([2.5]))
    t = ((0.1**2 + 2 * 19.9 * torch.log1p(torch.tensor(2.5**2))).sqrt() - 0.1) / 19.9
    torch.testing.assert_close(c.c_noise, 999 * t.reshape(1))
    assert float(c.c_skip) == 1 and float(c.c_out) == -2.5


def test_every_parameter_of_an_augmented_network_takes_part(edm_side, tmp_path):
    """EDM's CIFAR-10 networks have augment labels; fed zeros (no augmentation, SiD's input), the augment layer
    still takes part, so DDP finds no unused parameters in the students, and the output is the network's."""
    net = edm_side.VPPrecond(8, 1, augment_dim=9)
    write_snapshot(tmp_path / "aug.pkl", net)
    denoiser, _, _ = load_edm_denoiser(tmp_path / "aug.pkl", trust=True)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 5.0])
    denoiser(x, sigma).square().sum().backward()
    assert all(p.grad is not None for p in denoiser.parameters())
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, sigma), net(x, sigma), rtol=1e-5, atol=1e-5)


def test_distil_an_edm_pickle_and_reload_its_generator(edm_side, tmp_path):
    write_snapshot(tmp_path / "net.pkl", edm_side.EDMPrecond(8, 1))
    overrides = ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={tmp_path / 'net.pkl'}",
                 "teacher.edm_pickle.trust=true", "optim.batch=4", "train.total_nimg=8", "train.log_every_nimg=4",
                 f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.tensorboard=false",
                 "train.num_samples=4"]
    from sid.trainer import train

    run = train(load_config([], overrides))
    assert run.nimg == 8 and (tmp_path / "run" / "samples" / "compare.png").is_file()
    generator = load_generator(tmp_path / "run" / "generator")
    torch.testing.assert_close(generator.sample_seeds(range(3)), run.ema.model.sample_seeds(range(3)))

    with open(tmp_path / "net.pkl", "ab") as f:
        f.write(b"\0")                                                              # not the trusted file any more
    with pytest.raises(SidError, match="missing or changed"):
        load_generator(tmp_path / "run" / "generator")


def test_a_url_is_downloaded_once_into_the_hub_folder(edm_side, tmp_path, monkeypatch):
    write_snapshot(tmp_path / "net.pkl", edm_side.EDMPrecond(8, 1))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    url = (tmp_path / "net.pkl").as_uri()                                            # file:// reads like https://
    _, _, spec = load_edm_denoiser(url, trust=True)
    cached = Path(spec["path"])
    assert cached.name == "net.pkl" and cached.parent.parent == (tmp_path / "hub" / "sid").resolve()
    (tmp_path / "net.pkl").unlink()
    load_edm_denoiser(url, trust=True)                                               # the cached copy
    with pytest.raises(SidError, match="cannot download"):                          # same name, another URL
        load_edm_denoiser((tmp_path / "elsewhere" / "net.pkl").as_uri(), trust=True)


def test_bad_edm_pickles_are_one_clear_error(edm_side, tmp_path):
    def teacher(path, trust="true"):
        return build_teacher(load_config([], ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={path}",
                                              f"teacher.edm_pickle.trust={trust}"]).teacher)

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
