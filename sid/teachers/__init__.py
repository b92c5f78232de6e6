"""Teacher adapters: any pretrained model -> the denoiser contract (``sid/precond.py``), behind one face.

Each kind of teacher is one adapter module, ``sid/teachers/<kind>.py``, named by its section of the config
(``teacher.<kind>``; ``sid.config.TEACHER_KINDS`` lists them from the schema, the only list). Every adapter
exposes the same two functions::

    build(section, trust_code=False) -> Teacher                  # the teacher its config section names
    denoiser_from_spec(spec, trust_code=False) -> nn.Module      # an exported generator's architecture

and is the one place that decides whether its loading runs foreign code (a pickle, a factory function): only
with ``trust_code``. ``Teacher`` (``sid/teachers/base.py``) is all the trainer knows of a teacher.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import nn

from sid.config import TEACHER_KINDS
from sid.errors import SidError
from sid.teachers.base import Teacher

LEGACY_SPEC_KINDS = {"mlp": "analytic"}          # exports written before the spec was named by its teacher kind


def adapter(kind: str) -> ModuleType:
    """The adapter module of a teacher kind."""
    if kind not in TEACHER_KINDS:
        raise SidError(f"teacher.kind={kind!r} is unknown; choose one of {TEACHER_KINDS}")
    return importlib.import_module(f"sid.teachers.{kind}")


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
    """The teacher of ``cfg`` on the meta device, for the memory plan: a latent pipeline's networks built from their
    configs alone (nothing allocated, no weights read; a hub id's configs and tokenizers fetched, not its weights),
    other teachers built as ``build_teacher`` builds them (they are small) and moved there."""
    if cfg.kind == "diffusers":
        from sid.teachers.diffusers import latent_pipeline

        found = latent_pipeline(cfg.diffusers, weights=False)
        if found is not None:
            from sid.teachers.latent import load

            return load(*found, cfg.diffusers.resolution, meta=True).to("meta")
    return build_teacher(cfg, trust_code=trust_code).to("meta")


def denoiser_from_spec(spec: dict, trust_code: bool = False) -> nn.Module:
    """Rebuild a student architecture (random weights) from the spec an exported generator holds."""
    kind = LEGACY_SPEC_KINDS.get(spec.get("kind"), spec.get("kind"))
    if kind not in TEACHER_KINDS:
        raise SidError(f"unknown denoiser kind {spec.get('kind')!r} in an exported config; it was written by another "
                       "tool")
    return adapter(kind).denoiser_from_spec(spec, trust_code=trust_code)


def backbone_values(spec: dict) -> int | None:
    """How many values the network an exported spec describes holds (built on the meta device, where it costs
    nothing), for the kinds whose spec gives sizes; None for the others (a pickle or a function decides)."""
    kind = LEGACY_SPEC_KINDS.get(spec.get("kind"), spec.get("kind"))
    if kind not in ("analytic", "diffusers"):
        return None
    with torch.device("meta"):
        net = adapter(kind).backbone_from_spec(spec)
    return sum(t.numel() for t in net.state_dict().values())


def export_native(denoiser: nn.Module, spec: dict, sigma_init: float, out_dir, config: dict,
                  components: dict | None = None) -> None:
    """The generator also in its family's own form where the family has one (diffusers: a pipeline folder that
    diffusers loads, with a latent teacher's frozen ``components``: ``Teacher.components()``)."""
    if LEGACY_SPEC_KINDS.get(spec.get("kind"), spec.get("kind")) == "diffusers":
        from sid.teachers.pipeline import export_native as diffusers_export

        diffusers_export(denoiser, spec, sigma_init, out_dir, config, components)


def note_measured(folder, nimg: int, measured: dict) -> None:
    """Add what was measured at image ``nimg`` to the model card of the export in ``folder``, where the export
    is of that image count and has a card (its weights and config stay as written)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    try:
        config = json.loads((folder / "generator.json").read_text())
    except (OSError, ValueError):
        return
    if config.get("nimg") != nimg or not (folder / "model_index.json").is_file():
        return
    from sid.teachers.pipeline import write_card

    write_card(folder, {**config, **measured})


def load_native(folder) -> tuple[nn.Module, tuple[int, ...], float]:
    """(denoiser, sample shape, σ_init) of an export in its family's own form alone (diffusers: a pipeline
    folder with ``model_index.json``), for ``sid.load_generator``."""
    from sid.teachers.pipeline import load_native as diffusers_load

    return diffusers_load(folder)


def load_codec(folder):
    """The VAE (and text encoder and tokenizer) an export of a latent generator carries (its teacher's), or None
    for an export of a pixel-space one."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder = folder.parent if folder.is_file() else folder
    folder = folder / "generator" if not (folder / "model_index.json").is_file() else folder
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    from sid.teachers.latent import held
    from sid.teachers.latent import load_codec as load

    if not held(index, "vae"):
        return None
    try:
        return load(folder, index)
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"{folder}: its vae/, text_encoder/ or tokenizer/ cannot be loaded ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:160]}); export it again") from None


def load_clip(model: str):
    """(``CLIPModel``, ``CLIPProcessor``) from a folder (or a hub id, online), weights and configs only: the CLIP
    score's model (``sid.metrics.make_clip``)."""
    import transformers

    from sid.teachers.latent import quiet

    with quiet():
        return transformers.CLIPModel.from_pretrained(model).eval(), transformers.CLIPProcessor.from_pretrained(model)


def teacher_from_path(path: str) -> list[str] | None:
    """The config overrides naming a teacher given by its path alone (a diffusers folder, ``builtin:<name>``), or
    None when the path names none (it is then a config file or a preset)."""
    from sid.teachers import diffusers

    if diffusers.names_a_teacher(path):
        return ["teacher.kind=diffusers", f"teacher.diffusers.path={path}"]
    return None


__all__ = ["Teacher", "adapter", "build_architecture", "build_teacher", "denoiser_from_spec", "export_native",
           "load_clip", "load_codec", "load_native", "note_measured", "teacher_from_path"]
