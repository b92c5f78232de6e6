"""Exported generators in diffusers' own form, beside sid's files: the folder, its model card, reading it back.

A generator distilled from a diffusers UNet teacher is written as a diffusers pipeline folder (``unet/``,
``scheduler/``, ``model_index.json``, a model card). Where the teacher is EDM-preconditioned the scheduler is a
stock one-step ``EDMEulerScheduler`` and diffusers alone reproduces the generator; in every case
``SiDPipeline.from_pretrained(folder)`` does, offline, with no training code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import diffusers
from diffusers import DiffusionPipeline, EDMEulerScheduler, SchedulerMixin
from torch import nn

from sid.errors import SidError, described
from sid.precond import Preconditioned
from sid.teachers.diffusers.families import FAMILIES
from sid.teachers.diffusers.files import export_dir, held, quiet
from sid.teachers.diffusers.latent import index_family
from sid.teachers.diffusers.models import model_of
from sid.teachers.diffusers.pipeline import SiDPipeline, stock_settings
from sid.teachers.diffusers.rules import edm_output
from sid.teachers.diffusers.stock import DISCRETE, FLOW, StockForm, stock_form, stock_pipeline


def export_native(denoiser: Preconditioned, spec: dict, sigma_init: float, out_dir: Path, config: dict,
                  components: dict | None = None) -> None:
    """The generator in diffusers' form beside sid's files: ``unet/``, ``scheduler/``, ``model_index.json`` and a
    model card (from the export's ``config``); with a text-to-image teacher's ``components`` (VAE, text encoder,
    tokenizer) also those, written once (they are frozen: a folder that has them keeps them). A one-step generator
    of SD, SDXL, SD3 or FLUX is that family's stock pipeline (``stock.py``); otherwise the folder is a
    ``SiDPipeline``, whose scheduler is, for EDM-preconditioned teachers, a stock one-step ``EDMEulerScheduler``
    (σ_min = σ_max = σ_init), so that the network and scheduler alone reproduce the generator too."""
    out_dir = Path(out_dir)
    model = model_of(denoiser)
    if spec["prediction_type"] == "edm":
        scheduler = EDMEulerScheduler(sigma_min=sigma_init, sigma_max=sigma_init, sigma_data=denoiser.sigma_data,
                                      prediction_type=edm_output(spec.get("scheduler_config")))
    else:
        schedule = spec.get("scheduler_config") or {"_class_name": "DDPMScheduler"}
        cls = getattr(diffusers, schedule.get("_class_name", "DDPMScheduler"), None)
        cls = cls if isinstance(cls, type) and issubclass(cls, SchedulerMixin) else diffusers.DDPMScheduler
        scheduler = cls.from_config(schedule)
    family = spec.get("pipeline")
    slot = FAMILIES[family].network if family in FAMILIES else "unet"
    vae = (components or {}).get("vae")
    form = stock_form(spec, config, dict(vae.config)) if vae is not None else None
    if form is not None:                                   # the family's own pipeline class reproduces it
        pipeline = stock_pipeline(form, slot, model, components)
    else:
        settings = ({"teacher_pipeline": family, "sample_size": list(config["shape"][1:]),
                     "max_sequence_length": spec.get("max_sequence_length")} if family else {})
        settings.update(steps=config.get("steps", 1), renoise=config.get("renoise", "fresh"))
        pipeline = SiDPipeline(**{slot: model}, scheduler=scheduler, **(components or {}), sigma_init=sigma_init,
                               prediction_type=spec["prediction_type"], sigma_data=denoiser.sigma_data, **settings)
    written = [slot, "scheduler", *(name for name in (components or {}) if not (out_dir / name).is_dir())]
    tmp = out_dir / ".tmp-diffusers"
    shutil.rmtree(tmp, ignore_errors=True)
    try:                                                   # written beside, then moved in; never left behind
        with quiet():
            save_components(pipeline, written, tmp)
        pipeline.save_config(tmp)                          # model_index.json
        for name in written:
            shutil.rmtree(out_dir / name, ignore_errors=True)
            os.replace(tmp / name, out_dir / name)
        os.replace(tmp / "model_index.json", out_dir / "model_index.json")
        write_card(out_dir, config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_components(pipeline: DiffusionPipeline, names: list[str], folder: Path) -> None:
    """Each named component of a pipeline in its own subfolder, as ``save_pretrained`` writes it (weights as
    safetensors)."""
    for name in names:
        module = getattr(pipeline, name)
        if isinstance(module, nn.Module):
            module.save_pretrained(folder / name, safe_serialization=True)
        else:                                              # a scheduler or tokenizer
            module.save_pretrained(folder / name)


NETWORKS = ("UNet2DModel", "UNet2DConditionModel", *sorted({f.model for f in FAMILIES.values()}))


def load_native(folder: Path) -> tuple[Preconditioned, tuple[int, ...], float] | None:
    """(denoiser, sample shape, σ_init) of a diffusers-form export alone (``model_index.json``, ``unet/`` or
    ``transformer/``, ``scheduler/``), for ``sid.load_generator``; None for a folder without ``model_index.json``.
    Its components are loaded by the classes its index names only where those are diffusers' own networks and
    schedulers: an index cannot make this import or run other code."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        return None
    try:
        index = json.loads((folder / "model_index.json").read_text())
        slot = "transformer" if held(index, "transformer") else "unet"
        unet_lib, unet_name = index[slot]
        scheduler_lib, scheduler_name = index["scheduler"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SidError(f"{folder / 'model_index.json'} is not the index of a sid export ({type(e).__name__}); "
                       "export it again") from None
    scheduler_cls = getattr(diffusers, scheduler_name, None) if scheduler_lib == "diffusers" else None
    stock = index.get("_class_name") in (*DISCRETE, *FLOW)
    family = index["_class_name"] if stock else index_family(index)
    if (not (stock or index.get("_class_name") == "SiDPipeline") or unet_lib != "diffusers" or unet_name not in NETWORKS
            or not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin))
            or family not in (None, *FAMILIES)):
        raise SidError(f"{folder} is a diffusers folder, but not a sid export (SiDPipeline with a diffusers network "
                       "and scheduler); give the folder sid exported")
    try:
        unet = getattr(diffusers, unet_name).from_pretrained(folder / slot, use_safetensors=True)
        scheduler = scheduler_cls.from_pretrained(folder / "scheduler")
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"{folder}: its unet/ or scheduler/ cannot be loaded ({described(e)}); "
                       "export it again") from None
    named = ("sigma_init", "prediction_type", "sigma_data", "sample_size", "steps", "renoise")
    settings = stock_settings(folder, scheduler) if stock else {k: index[k] for k in named if k in index}
    pipeline = SiDPipeline(**{slot: unet}, scheduler=scheduler, teacher_pipeline=family, **settings)
    config = pipeline.config
    return pipeline.denoiser(), pipeline.sample_shape(), float(config.sigma_init), config.steps, config.renoise


def note_native(folder: Path, config: dict) -> None:
    """The model card of the diffusers form in ``folder`` rewritten from ``config`` (with what was measured), where
    the export has that form."""
    if (Path(folder) / "model_index.json").is_file():
        write_card(folder, config)


def write_card(folder: Path, config: dict) -> None:
    """The model card of an export, written beside and renamed (a reader never sees half of one)."""
    tmp = Path(folder) / ".README.md.tmp"
    tmp.write_text(model_card(config, written_form(folder, config)))
    os.replace(tmp, Path(folder) / "README.md")


def evaluations(config: dict) -> str:
    """How many network evaluations a sample takes, as the model card says it."""
    steps = config.get("steps", 1)
    if steps == 1:
        return ": one network evaluation per sample"
    return (f", then {steps - 1} more steps re-noised ({config.get('renoise', 'fresh')}) on SiD-DiT's schedule: "
            f"{steps} network evaluations per sample")


def written_form(folder: Path, config: dict) -> StockForm | None:
    """The stock form of the export in ``folder`` (from its VAE's config), where its index names that pipeline."""
    try:
        vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    form = stock_form(config["denoiser"], config, vae)
    return form if form is not None and index.get("_class_name") == form.pipeline else None


def stock_call(path) -> str | None:
    """The diffusers lines that draw an export's images, where it is in its family's stock form (``path``: the
    export or its run folder); None otherwise."""
    folder = export_dir(path)
    try:
        form = written_form(folder, json.loads((folder / "generator.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if form is None:
        return None
    return (f"{folder} is a stock {form.pipeline}; in diffusers alone: pipe = DiffusionPipeline.from_pretrained("
            f"{str(folder)!r}); {form.call_text()}")


def stock_use(form: StockForm) -> str:
    """How to use a stock-form export, in the model card."""
    return (f"With diffusers alone (this folder is a stock `{form.pipeline}`; sid is not needed):\n\n"
            "```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
            'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")\n'
            f"image = {form.call_text()}.images[0]\n```\n\n"
            "These arguments are the generator exactly: its guidance was distilled into it, so it takes none "
            "(`guidance_scale=1.0`)" + ("" if form.plain else "; its σ_init lies between two of the teacher's "
                                          "timesteps, so the one step is given as `sigmas`") + ".\n")


def no_stock(spec: dict, config: dict) -> str:
    """Why no stock diffusers pipeline reproduces this generator, as its card says."""
    if config.get("steps", 1) != 1:
        return (f"no stock scheduler re-noises between steps as this {config['steps']}-step generator does "
                f"({config.get('renoise', 'fresh')})")
    if spec.get("pipeline") in FLOW:
        return "it starts below t = 1, and flow pipelines start from pure noise"
    if spec.get("pipeline") is None or spec.get("pipeline") == "DiTPipeline":
        return ("diffusers' pipelines for this network start from unscaled noise z, so no scheduler config starts "
                "their step at σ_init z")
    return "no stock scheduler config lands its one step on this generator's noise level"


def model_card(config: dict, form: StockForm | None = None) -> str:
    """The README.md of a diffusers-form export: what it is, how it was made, what it measured, how to use it."""
    spec, run = config["denoiser"], config.get("config") or {}
    teacher = (run.get("teacher") or {}).get("diffusers") or {}
    source = teacher.get("path") or "a UNet built from its config"
    evaluation = run.get("eval") or {}
    measured = ""
    if isinstance(config.get("fid"), (int, float)):
        measured = (f"FID-{evaluation.get('num', '?')} {config['fid']:.4g} (EMA generator, seeds from 0, against "
                    f"`{evaluation.get('fid_ref')}`, measured in training as `sid fid gen` measures)")
    shape, unet = ", ".join(map(str, config["shape"])), spec.get("class_name")
    family = FAMILIES.get(spec.get("pipeline"))
    call = ('"a photo of a cat", batch_size=4' if family and family.text_to_image else
            "class_labels=[207, 360, 387, 974]" if family else "batch_size=4")
    pipeline = ("```python\nfrom sid import SiDPipeline\n\n"
                f'images = SiDPipeline.from_pretrained("path/to/this/folder")({call}).images      # PIL images\n'
                "```\n")
    if form is not None:
        use = stock_use(form)
    elif spec.get("prediction_type") == "edm" and config.get("steps", 1) == 1:
        use = ("With diffusers alone (the scheduler is a one-step `EDMEulerScheduler`, σ_min = σ_max = σ_init):\n\n"
               "```python\nimport torch\n"
               f"from diffusers import EDMEulerScheduler, {unet}\n\n"
               f'unet = {unet}.from_pretrained("path/to/this/folder", subfolder="unet")\n'
               'scheduler = EDMEulerScheduler.from_pretrained("path/to/this/folder", subfolder="scheduler")\n'
               "scheduler.set_timesteps(1)\n"
               f"t, x = scheduler.timesteps[0], torch.randn(4, {shape}) * scheduler.sigmas[0]\n"
               "images = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).pred_original_sample"
               "  # in [-1, 1]\n```\n\nOr, as with every sid export:\n\n" + pipeline)
    else:
        why = no_stock(spec, config)
        use = f"With sid's pipeline class (the teacher's VP or flow schedule around the network; {why}):\n\n" + pipeline
    return (f"---\nlibrary_name: diffusers\ntags: [sid, one-step, distillation, score-identity-distillation]\n---\n\n"
            f"# One-step generator distilled by sid\n\n"
            f"A one-step generator of {'×'.join(map(str, config['shape']))} samples, distilled data-free from the "
            f"diffusers teacher `{source}` ({unet}, prediction type `{spec.get('prediction_type')}`) with the "
            f"identity-based loss at λ = {config.get('lam')}, after {config.get('nimg', 0):,} generator images"
            f"{'; measured: ' + measured if measured else ''}. G(z) = D(σ_init z; σ_init) with σ_init = "
            f"{config['sigma_init']}{evaluations(config)}.\n\n{use}\n"
            "`generator.safetensors` and `generator.json` beside it hold the same weights for `sid.load_generator`; "
            "the run's whole config is in `generator.json`.\n")
