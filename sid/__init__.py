"""sid: one-step distillation of diffusion models with identity-based losses (SiD, FGM, any λ).

The public API, importable from here::

    from sid import load_config, train, load_generator

    cfg = load_config(["toy_2d"], ["loss.lam=0.75", "train.run_dir=runs/api"])
    run = train(cfg)                                  # the finished run: run.ema.model, run.nimg, ...
    generator = load_generator("runs/api/generator")  # the exported EMA generator, on its own

The names load lazily, so ``import sid`` (and the ``sid`` command's help) does not import torch or Accelerate.
"""

from __future__ import annotations

import importlib

_API = {
    "load_config": "sid.config",
    "train": "sid.trainer",
    "load_generator": "sid.generator",
    "OneStepGenerator": "sid.generator",
    "push_to_hub": "sid.generator",
    "build_teacher": "sid.teachers",
    "Teacher": "sid.teachers",
    "Preconditioned": "sid.precond",
    "EDMRule": "sid.precond",
    "SiDPipeline": "sid.teachers.diffusers",
    "FlowRule": "sid.precond",
    "SidError": "sid.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'sid' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
