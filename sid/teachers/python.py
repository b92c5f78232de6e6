"""``teacher.kind=python``: teachers built by the user's own code, ``teacher.python.factory=package.module:function``.

For networks that are neither diffusers models nor EDM pickles. The function, called with
``teacher.python.kwargs``, returns the pretrained network as a denoiser under the contract of
``sid/precond.py``: an ``nn.Module`` ``D(x, sigma, labels=None) -> x0_hat`` in EDM units, with ``sigma_min``,
``sigma_max``, ``sigma_data`` and ``label_dim``. A raw network ``F(c_in x, c_noise, labels)`` becomes one as
``Preconditioned(net, EDMRule(sigma_data))``. Its students are copies of it, as for every network teacher.

An exported generator names the function and its arguments, which rebuild its architecture when it loads;
since that runs code named in a file, loading it asks for ``trust_code=True``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

import torch
from torch import nn

from sid.config import plain
from sid.errors import SidError, described
from sid.teachers.base import Teacher

CONTRACT = ("sigma_min", "sigma_max", "sigma_data", "label_dim")


def import_factory(name: str) -> Callable:
    """``package.module:function`` -> the function; modules are found on the Python path or in the working
    directory."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise SidError(f"teacher.python.factory={name!r}: expected 'package.module:function'")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise SidError(f"teacher.python.factory={name!r}: no module named {e.name!r} on the Python path or in the "
                       f"working directory {os.getcwd()}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SidError(f"teacher.python.factory={name!r}: module {module_name} has no function {attr!r}")
    return factory


def check_contract(denoiser, shape: tuple[int, ...], factory: str) -> None:
    """One clear error unless ``denoiser`` is a module with the contract's attributes that maps two noisy
    samples of ``shape`` to two finite predictions of the same shape."""
    if not isinstance(denoiser, nn.Module):
        raise SidError(f"{factory} returned a {type(denoiser).__name__}, not a torch.nn.Module denoiser")
    missing = [a for a in CONTRACT if not hasattr(denoiser, a)]
    if missing:
        raise SidError(f"the denoiser from {factory} lacks {', '.join(missing)} (the contract in sid/precond.py; "
                       "wrapping the network in sid.precond.Preconditioned provides them)")
    denoiser.eval()                                                                  # the check without dropout
    device = next(denoiser.parameters(), torch.empty(0)).device
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)     # global RNG untouched
    labels = None
    if denoiser.label_dim:
        labels = nn.functional.one_hot(torch.arange(2, device=device) % denoiser.label_dim, denoiser.label_dim)
    with torch.no_grad():
        out = denoiser(x, torch.tensor([0.5, 5.0], device=device), None if labels is None else labels.float())
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SidError(f"the denoiser from {factory} maps noisy samples of shape {tuple(x.shape)} to {got}; it must "
                       f"return x0_hat of the same shape (teacher.python.shape={list(shape)})")
    if not out.isfinite().all():
        raise SidError(f"the denoiser from {factory} returns non-finite values for finite inputs")


def build(section, trust_code: bool = False) -> Teacher:
    """The network that ``teacher.python.factory`` returns for ``teacher.python.kwargs``, as a teacher; importing
    and calling it runs code a config file names, so only with ``trust_code``."""
    if not trust_code:
        raise SidError(f"teacher.python.factory={section.factory} runs Python code that a config names: if you "
                       "trust it, pass --trust-code (trust_code=True in Python)")
    denoiser, spec = load_denoiser(section.factory, plain(section.kwargs), plain(section.shape))
    return Teacher(denoiser, spec["shape"], spec)


def load_denoiser(factory: str, kwargs: dict, shape) -> tuple[nn.Module, dict]:
    """(denoiser, spec) from the user's function; the spec rebuilds it for exported generators."""
    shape = tuple(shape)
    if not shape:
        raise SidError("teacher.kind=python needs teacher.python.shape, one sample's shape, e.g. [3, 32, 32]")
    function = import_factory(factory)
    try:
        denoiser = function(**kwargs)
    except Exception as e:                  # the user's code: its error, in one line (the chain keeps the rest)
        raise SidError(f"{factory} with arguments {kwargs} failed: {described(e, 300)}") from e
    check_contract(denoiser, shape, factory)
    return denoiser, {"kind": "python", "factory": factory, "kwargs": kwargs, "shape": list(shape)}


def spec_shape(spec: dict) -> tuple[int, ...]:
    """The sample shape the run's function was built for."""
    return tuple(spec["shape"])


def denoiser_from_spec(spec: dict, trust_code: bool = False) -> nn.Module:
    """An exported generator's architecture, rebuilt by the function its run was distilled with."""
    if not trust_code:
        raise SidError(f"this generator's architecture is built by the Python function {spec['factory']} (arguments "
                       f"{spec['kwargs']}), and loading it runs that function: load it with trust_code=True "
                       "(--trust-code on the command line) if you trust this file")
    return load_denoiser(spec["factory"], spec["kwargs"], spec["shape"])[0]
