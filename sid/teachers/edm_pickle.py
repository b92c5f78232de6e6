"""``teacher.kind=edm_pickle``: NVIDIA EDM network pickles (``edm-*.pkl``, ``network-snapshot-*.pkl``) as EDM
denoisers.

EDM pickles carry the source code of their networks (EDM's ``torch_utils.persistence``), and unpickling
executes it: a pickle is loaded only with ``trust_code`` (``--trust-code`` on the command line), never on a
file's say: an exported generator that names a pickle needs it too, since its SHA-256 comes from the same file.
EDM's repository is not needed; the few names a pickle refers to outside its own code
(``torch_utils.persistence``, ``dnnlib.EasyDict``) are provided here while it loads.

Of the unpickled ``ema`` network only the backbone (``.model``: SongUNet, DhariwalUNet) is kept. Its
preconditioning object (EDM's EDMPrecond, VPPrecond or VEPrecond) is replaced by the same coefficients
(``EDMRule``, ``ContinuousVPRule``, ``VERule``) in ``Preconditioned``, so the precision policy is sid's:
coefficients in fp32, the backbone under autocast.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import pickle
import sys
import types
import urllib.parse
from pathlib import Path

import torch
from torch import nn

from sid.checkpoint import file_sha256 as sha256
from sid.errors import SidError, described
from sid.precond import ContinuousVPRule, EDMRule, Preconditioned, VERule
from sid.teachers.base import Teacher

EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0      # EDM's sampling range, which clips every pickle's own range


class EasyDict(dict):
    """dnnlib.EasyDict: a dict with attribute access (found in EDM pickles' keyword arguments)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


class Unavailable:
    """Stands for a pickled object whose code could not run here (e.g. an augmentation pipe); only an error
    if it is the network asked for."""

    def __init__(self, class_name: str, error: str):
        self.class_name, self.error = class_name, error


_MODULES: dict[str, types.ModuleType] = {}       # pickled source -> the module it was executed into


@contextlib.contextmanager
def _edm_names():
    """``torch_utils.persistence`` and ``dnnlib`` as the pickled code imports them, while it is executed."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls              # recording sources matters only when pickling
    package = types.ModuleType("torch_utils")
    package.persistence, package.misc = persistence, types.ModuleType("torch_utils.misc")
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.EasyDict = EasyDict
    dnnlib.util = types.SimpleNamespace(EasyDict=EasyDict)
    names = {"torch_utils": package, "torch_utils.persistence": persistence, "torch_utils.misc": package.misc,
             "dnnlib": dnnlib}
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(names)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _module_from_source(source: str) -> types.ModuleType:
    """Execute pickled module source once per distinct source, as EDM's persistence does."""
    if source not in _MODULES:
        name = "_sid_edm_" + hashlib.sha256(source.encode()).hexdigest()[:16]
        module = types.ModuleType(name)
        with _edm_names():
            exec(compile(source, f"<{name}>", "exec"), module.__dict__)     # noqa: S102 (behind the trust flag)
        sys.modules[name] = module
        _MODULES[source] = module
    return _MODULES[source]


def _reconstruct(meta: dict):
    """EDM's ``_reconstruct_persistent_obj``: build the object of ``meta['class_name']`` from the pickled source
    and restore its state (an ``nn.Module``'s ``__dict__``)."""
    try:
        cls = getattr(_module_from_source(meta["module_src"]), meta["class_name"])
    except Exception as e:                                          # any failure of foreign code, reported later
        return Unavailable(meta.get("class_name", "?"), described(e))
    obj = cls.__new__(cls)
    state = EasyDict(meta["state"])
    if callable(getattr(obj, "__setstate__", None)):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    return obj


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return _reconstruct
        if module in ("dnnlib", "dnnlib.util") and name == "EasyDict":
            return EasyDict
        return super().find_class(module, name)




def local_file(path: str | Path) -> Path:
    """A local path as it is; a URL (EDM's released pickles are at https://nvlabs-fi-cdn.nvidia.com/edm/) is
    downloaded once into torch's hub folder, ``<torch.hub.get_dir()>/sid/<hash of the URL>/<file name>``."""
    if "://" not in str(path):
        return Path(path)
    url_hash = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    target = Path(torch.hub.get_dir()) / "sid" / url_hash / Path(urllib.parse.urlparse(str(path)).path).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(str(path), str(target), progress=False)   # to a temporary file first
        except (OSError, ValueError) as e:                                          # URLError is an OSError
            raise SidError(f"cannot download {path} ({type(e).__name__}: {e}); download it and give the local "
                           "file as teacher.edm_pickle.path") from None
    return target


def read_pickle(path: Path) -> nn.Module:
    """The EDM network in a pickle: ``data['ema']`` of an EDM snapshot, or the pickled network itself."""
    if path.is_dir():
        raise SidError(f"EDM pickle path {path} is a folder; give the .pkl file (a diffusers folder is "
                       "teacher.kind=diffusers)")
    if not path.is_file():
        raise SidError(f"EDM pickle {path} not found")
    try:
        with open(path, "rb") as f:
            data = _Unpickler(f).load()
    except Exception as e:               # a damaged file, or the pickle's own code failing: any exception at all
        raise SidError(f"{path} is not a readable EDM pickle ({described(e)})") from None
    net = data.get("ema") if isinstance(data, dict) else data
    if isinstance(net, Unavailable):
        raise SidError(f"the network in {path} ({net.class_name}) could not be rebuilt from its code: {net.error}")
    if not isinstance(net, nn.Module):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise SidError(f"{path} holds no EDM network (found {found}); expected an EDM snapshot with 'ema'")
    return net


class EDMBackbone(nn.Module):
    """``F(x_in, c_noise, labels, augment_labels=None)`` over an EDM network (``model`` of a pickled preconditioner).

    Networks trained with augmentation (EDM's CIFAR-10 DDPM++: 9 augment labels) take the labels of the fake-score
    step's augmentation (``loss.augment``) and otherwise zeros, "no augmentation", as SiD does, rather than none:
    then every parameter takes part in the forward, which DistributedDataParallel requires of the students.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        augment = getattr(model, "map_augment", None)
        self.augment_dim = augment.in_features if augment is not None else 0

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.augment_dim:
            return self.model(x_in, c_noise, labels)
        if augment_labels is None:
            augment_labels = x_in.new_zeros(x_in.shape[0], self.augment_dim)
        return self.model(x_in, c_noise, labels, augment_labels=augment_labels.to(x_in.dtype))


def coefficient_rule(net: nn.Module, sigma_data: float) -> nn.Module:
    """The pickled preconditioner's coefficients, its σ range clipped to EDM's sampling range [0.002, 80]."""
    kind = type(net).__name__
    lo = max(EDM_SIGMA_MIN, float(getattr(net, "sigma_min", 0.0)))
    hi = min(EDM_SIGMA_MAX, float(getattr(net, "sigma_max", math.inf)))
    if kind == "EDMPrecond":
        return EDMRule(float(net.sigma_data), lo, hi)
    if kind == "VPPrecond":
        return ContinuousVPRule(float(net.beta_d), float(net.beta_min), int(net.M), sigma_data=sigma_data,
                                sigma_min=lo, sigma_max=hi)
    if kind == "VEPrecond":
        return VERule(sigma_data, lo, hi)
    raise SidError(f"EDM network class {kind!r} is not supported; supported: EDMPrecond, VPPrecond, VEPrecond")


def build(section, trust_code: bool = False) -> Teacher:
    """The network of ``teacher.edm_pickle``'s pickle as a teacher; it takes augmentation labels if its
    backbone was trained with them (EDM's CIFAR-10 networks: 9)."""
    denoiser, shape, spec = load_denoiser(section.path, trust_code, section.sigma_data, section.dropout)
    return Teacher(denoiser, shape, spec, augment_dim=denoiser.net.augment_dim, zero_label_is_null=True)


def load_denoiser(path: str | Path, trust: bool, sigma_data: float = 0.5, dropout: float | None = None):
    """(denoiser, sample shape, spec) of an EDM pickle's network; ``sigma_data`` for VP and VE networks, whose
    preconditioning has none (the fake-score loss weight uses it); ``dropout``: the rate of its blocks."""
    if not trust:
        raise SidError(f"loading {path} runs the code stored in the pickle: if you trust its source, pass "
                       "--trust-code (trust_code=True in Python)")
    path = local_file(path).resolve()
    denoiser, shape = denoiser_from_pickle(path, sigma_data, dropout)
    spec = {"kind": "edm_pickle", "path": str(path), "sha256": sha256(path), "sigma_data": sigma_data,
            "dropout": dropout}
    return denoiser, shape, spec


def denoiser_from_pickle(path: Path, sigma_data: float, dropout: float | None = None):
    """The pickled network as a ``Preconditioned`` denoiser, and its sample shape (C, H, W); one line where the
    object is not the EDM network it names (a damaged file, another class under its name)."""
    net = read_pickle(path)
    try:
        rule = coefficient_rule(net, sigma_data)
        if dropout is not None:
            set_dropout(net.model, dropout, path)
        denoiser = Preconditioned(EDMBackbone(net.model), rule, label_dim=int(net.label_dim)).float()
        return denoiser, (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    except SidError:
        raise
    except Exception as e:               # foreign code's object: any attribute may be missing or fail
        raise SidError(f"the network in {path} ({type(net).__name__}) is not an EDM network sid can use "
                       f"({described(e)}); give an EDM snapshot (network-snapshot-*.pkl)") from None


def set_dropout(model: nn.Module, rate: float, path: Path) -> None:
    """The dropout rate of every EDM ``UNetBlock`` (it keeps the rate as a number and applies it in forward), as
    SiD's training script sets it for the networks it builds (``--dropout``, 0.13 for CIFAR-10)."""
    blocks = [m for m in model.modules() if type(m).__name__ == "UNetBlock" and isinstance(m.dropout, float)]
    if not blocks:
        raise SidError(f"the network in {path} has no UNetBlock with a dropout rate; leave "
                       "teacher.edm_pickle.dropout unset")
    for block in blocks:
        block.dropout = float(rate)


def denoiser_from_spec(spec: dict, trust_code: bool = False) -> Preconditioned:
    """An exported generator's architecture, from the pickle its run was trusted with (same SHA-256); unpickling
    it runs its code, so only with ``trust_code``."""
    if not trust_code:
        raise SidError(f"this generator's architecture is rebuilt by unpickling {spec.get('path')}, which runs the "
                       "code stored in it: load it with trust_code=True (--trust-code) if you trust that file")
    path = Path(spec["path"])
    if not path.is_file() or sha256(path) != spec["sha256"]:
        raise SidError(f"this generator's architecture comes from the EDM pickle {path}, which is missing or "
                       f"changed (SHA-256 {spec['sha256'][:12]}...); put that file back to load it")
    return denoiser_from_pickle(path, spec["sigma_data"], spec.get("dropout"))[0]
