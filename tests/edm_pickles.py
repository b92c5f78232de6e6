"""EDM pickles written the way EDM writes them, for the tests: every network object as a call of
``torch_utils.persistence._reconstruct_persistent_obj`` with its module's source, class name and state.

The source is a tiny stand-in for EDM's ``training/networks.py``: the three preconditioners around one
backbone with EDM's call signature, their coefficients written out as in EDM's Table 1. The ``edm_side``
fixture (registered in conftest.py) provides EDM's modules while a test writes its pickles.
"""

import pickle
import sys
import types

import pytest
import torch

NETWORKS_SOURCE = '''
import numpy as np
import torch
from torch_utils import persistence


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self, channels, dropout=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.dropout = dropout

    def forward(self, x):
        h = torch.nn.functional.dropout(torch.nn.functional.silu(x), p=self.dropout, training=self.training)
        return x + self.conv(h)


@persistence.persistent_class
class TinyUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, channels=8,
                 dropout=0.1):
        super().__init__()
        self.emb = torch.nn.Linear(2, channels)
        self.map_label = torch.nn.Linear(label_dim, channels) if label_dim else None
        self.map_augment = torch.nn.Linear(augment_dim, channels, bias=False) if augment_dim else None
        self.conv0 = torch.nn.Conv2d(in_channels, channels, 3, padding=1)
        self.block = UNetBlock(channels, dropout)
        self.conv1 = torch.nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.emb(torch.stack([noise_labels.cos(), (noise_labels / 100).sin()], dim=1))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return self.conv1(self.block(torch.nn.functional.silu(self.conv0(x) + emb[:, :, None, None])))


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


def without_edm(monkeypatch) -> None:
    """A machine without EDM's code: its modules gone from sys.modules (the pickles are already written)."""
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def write_snapshot(path, net):
    """An EDM training snapshot: the network under 'ema', next to objects the loader must get past."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with open(path, "wb") as f:
        pickle.dump({"ema": net.eval(), "loss_fn": None, "augment_pipe": Opaque(),
                     "dataset_kwargs": EasyDict(resolution=8)}, f)
