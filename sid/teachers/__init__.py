"""Teacher adapters: any pretrained model -> the denoiser contract (``sid/precond.py``), behind one face.

Each kind of teacher is one adapter, ``sid/teachers/<kind>.py`` or ``sid/teachers/<kind>/``, named by its section of
the config (``sid.schema.TEACHER_KINDS``, the only list). Every adapter exposes ``build(section, trust_code=False) ->
Teacher`` and ``denoiser_from_spec(spec, trust_code=False)`` (an export's architecture), and may expose what only
some kinds can do (``ability``): ``backbone_from_spec``, ``spec_shape``, ``architecture`` (the memory plan's meta
teacher), ``names_a_teacher``, and a form of its own for exports (``export_native``, ``note_native``,
``load_native``). An adapter runs foreign code (a pickle, a factory function) only with ``trust_code``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import nn

from sid.errors import SidError
from sid.schema import TEACHER_KINDS
from sid.teachers.base import Teacher

LEGACY_SPEC_KINDS = {"mlp": "analytic"}          # exports written before the spec was named by its teacher kind


def adapter(kind: str) -> ModuleType:
    """The adapter module of a teacher kind."""
    if kind not in TEACHER_KINDS:
        raise SidError(f"teacher.kind={kind!r} is unknown; choose one of {TEACHER_KINDS}")
    return importlib.import_module(f"sid.teachers.{kind}")


def ability(kind: str, name: str):
    """The adapter's optional function ``name``, or one doing nothing (returning None) where its kind has none."""
    return getattr(adapter(kind), name, lambda *args, **kwargs: None)


def spec_kind(spec: dict) -> str:
    """The teacher kind an exported spec names (one line for a spec another tool wrote)."""
    kind = LEGACY_SPEC_KINDS.get(spec.get("kind"), spec.get("kind"))
    if kind not in TEACHER_KINDS:
        raise SidError(f"unknown denoiser kind {spec.get('kind')!r} in an exported config; it was written by another "
                       "tool")
    return kind


def build_teacher(cfg, trust_code: bool = False) -> Teacher:
    """The teacher named by the ``teacher`` section of the config; a network teacher's weights must be finite."""
    teacher = adapter(cfg.kind).build(cfg[cfg.kind], trust_code=trust_code)
    state = teacher.denoiser.state_dict()
    bad = [name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise SidError(f"the teacher's weights hold NaN or inf ({len(bad)} of {len(state)} tensors, e.g. {bad[0]}): "
                       "its file is damaged or comes from a diverged run; give another checkpoint")
    return teacher


def build_architecture(cfg, trust_code: bool = False) -> Teacher:
    """The teacher on the meta device (the memory plan): its adapter's ``architecture``, else built and moved."""
    teacher = ability(cfg.kind, "architecture")(cfg[cfg.kind], trust_code=trust_code)
    return teacher if teacher is not None else build_teacher(cfg, trust_code=trust_code).to("meta")


def denoiser_from_spec(spec: dict, trust_code: bool = False) -> nn.Module:
    """Rebuild a student architecture (random weights) from the spec an exported generator holds."""
    return adapter(spec_kind(spec)).denoiser_from_spec(spec, trust_code=trust_code)


def backbone_values(spec: dict) -> int | None:
    """How many values the network an exported spec describes holds (built on the meta device, at no cost); None
    where a pickle or a function decides its size."""
    with torch.device("meta"):
        net = ability(spec_kind(spec), "backbone_from_spec")(spec)
    return None if net is None else sum(t.numel() for t in net.state_dict().values())


def export_native(denoiser: nn.Module, spec: dict, sigma_init: float, out_dir, config: dict,
                  components: dict | None = None) -> None:
    """The generator also in its family's own form, where it has one (with ``Teacher.components()``)."""
    if spec.get("kind") in TEACHER_KINDS:                         # another tool's kind: its weights alone
        ability(spec["kind"], "export_native")(denoiser, spec, sigma_init, out_dir, config, components)


def note_native(folder, config: dict) -> None:
    """What an export's own form says of it (its model card) rewritten from ``config``, with what was measured."""
    ability(spec_kind(config["denoiser"]), "note_native")(folder, config)


def load_native(folder) -> tuple[nn.Module, tuple[int, ...], float] | None:
    """(denoiser, sample shape, σ_init) of an export in its family's own form alone; None where there is none."""
    for kind in TEACHER_KINDS:
        found = ability(kind, "load_native")(folder)
        if found is not None:
            return found
    return None


def teacher_from_path(path: str) -> list[str] | None:
    """The overrides naming the teacher a path alone names (a diffusers folder), or None (a config or preset)."""
    for kind in TEACHER_KINDS:
        if ability(kind, "names_a_teacher")(path):
            return [f"teacher.kind={kind}", f"teacher.{kind}.path={path}"]
    return None


__all__ = ["Teacher", "build_architecture", "build_teacher", "denoiser_from_spec", "load_native", "teacher_from_path"]
