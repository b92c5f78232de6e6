"""Exported generators in diffusers' own form: ``SiDPipeline`` and the export beside sid's files.

A generator distilled from a diffusers UNet teacher is written as a diffusers pipeline folder (``unet/``,
``scheduler/``, ``model_index.json``, a model card). Where the teacher is EDM-preconditioned the scheduler is a
stock one-step ``EDMEulerScheduler`` and diffusers alone reproduces the generator; in every case
``SiDPipeline.from_pretrained(folder)`` does, offline, with no training code.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler, SchedulerMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from sid.errors import SidError, described
from sid.precond import Preconditioned
from sid.steps import generate
from sid.teachers.diffusers.codecs import ImageCodec, vae_factor
from sid.teachers.diffusers.families import FAMILIES, family_of
from sid.teachers.diffusers.files import held, quiet
from sid.teachers.diffusers.latent import export_family, index_family, latent_denoiser, with_length
from sid.teachers.diffusers.models import model_of, own_shape
from sid.teachers.diffusers.rules import edm_output, prediction_of
from sid.teachers.diffusers.stock import DISCRETE, FLOW, StockForm, stock_form, stock_pipeline
from sid.teachers.diffusers.unet import denoiser_from_unet

TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


class SiDPipeline(DiffusionPipeline):
    """A one-step generator as a diffusers pipeline: ``SiDPipeline.from_pretrained(folder)(batch_size=4).images``,
    or, distilled from a text-to-image teacher, ``SiDPipeline.from_pretrained(folder)("a photo of a cat").images``.

    ``unet`` (or ``transformer``) is the generator's network, ``scheduler`` the teacher's (its parameterisation);
    the pipeline's config names σ_init, the prediction type, σ_data and, for a latent generator, its teacher's
    pipeline class and latent size. One network evaluation: x = D(σ_init z; σ_init, c), with D the teacher's
    coefficient rule around the network, as ``sid`` trained it. A latent generator also holds its teacher's VAE (and
    text encoders and tokenizers): c is the prompt's encoding, as the teacher's pipeline encodes it, and x the
    latents the VAE decodes.
    """

    _optional_components = ["unet", "transformer", "vae", *TEXT_PARTS]

    def __init__(self, scheduler, unet=None, vae=None, text_encoder=None, tokenizer=None, transformer=None,
                 text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                 sigma_init: float = 2.5, prediction_type: str = "edm", sigma_data: float = 0.5,
                 teacher_pipeline: str | None = None, sample_size: list[int] | None = None,
                 max_sequence_length: int | None = None, steps: int = 1, renoise: str = "fresh"):
        super().__init__()
        teacher_pipeline = export_family(teacher_pipeline, transformer is not None, text_encoder is not None)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, transformer=transformer,
                              text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.register_to_config(sigma_init=sigma_init, prediction_type=prediction_type, sigma_data=sigma_data,
                                teacher_pipeline=teacher_pipeline, sample_size=sample_size,
                                max_sequence_length=max_sequence_length, steps=steps, renoise=renoise)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``; an export in its family's stock form (``stock.py``) is read as
        diffusers reads it, and its generator's settings from sid's ``generator.json`` beside it."""
        folder = Path(pretrained_model_name_or_path)
        index = folder / "model_index.json"
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        if name not in (*DISCRETE, *FLOW):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        stock = DiffusionPipeline.from_pretrained(folder, **kwargs)
        parts = {k: v for k, v in stock.components.items()
                 if v is not None and k in inspect.signature(cls.__init__).parameters}
        return cls(**parts, teacher_pipeline=name, **stock_settings(folder, stock.scheduler))

    @property
    def family(self) -> str | None:
        """The teacher's latent pipeline class (None: a pixel-space generator)."""
        return self.config.teacher_pipeline

    @property
    def text_to_image(self) -> bool:
        return self.family in FAMILIES and FAMILIES[self.family].text_to_image

    @property
    def network(self) -> nn.Module:
        return self.unet if self.transformer is None else self.transformer

    def denoiser(self) -> Preconditioned:
        """The generator's network under its coefficient rule (and its teacher family's backbone)."""
        config = {k: v for k, v in dict(self.scheduler.config).items()}
        config["_class_name"] = type(self.scheduler).__name__
        if self.family is not None:
            return latent_denoiser(self.family, self.network, self.config.prediction_type, config,
                                   self.config.sigma_data)
        return denoiser_from_unet(self.unet, self.config.prediction_type, config, self.config.sigma_data)

    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape: the network's channels at the export's latent size (else the network's own)."""
        size, network = self.config.sample_size, self.network
        if size:
            channels = network.config.in_channels if self.family is None else family_of(self.family).channels(
                network.config)
            return (channels, *size)
        return own_shape(network) if self.family is None else family_of(self.family).latent_shape(network, 1)

    def codec(self) -> ImageCodec | None:
        """The VAE (and the text encoders and tokenizers), as the teacher used them (latent generators), or None."""
        if self.vae is None:
            return None
        parts = {name: getattr(self, name) for name in TEXT_PARTS if getattr(self, name) is not None}
        factor = vae_factor(self.vae.config)
        shape = self.sample_shape()
        codec = family_of(self.family).codec.build(self.vae, parts, self.network, dict(self.config),
                                                   (shape[1] * factor, shape[2] * factor))
        return with_length(codec, self.config.max_sequence_length, self.family)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, batch_size: int = 1,
                 generator: torch.Generator | None = None, class_labels=None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, num_inference_steps: int | None = None):
        """``prompt``: one prompt per image (a text-to-image generator; a single one is used ``batch_size`` times);
        ``latents``: the noise z ~ N(0, I) itself, instead of drawing it from ``generator``; ``output_type``:
        ``pil``, ``np``, ``pt`` (images in [-1, 1]) or ``latent`` (a latent generator's latents);
        ``num_inference_steps``: other than the generator's own step count (its config's ``steps``; ``sid.steps``)."""
        denoiser, codec = self.denoiser(), self.codec()
        cond = None
        if self.text_to_image:
            if prompt is None:
                raise ValueError("this generator was distilled from a text-to-image teacher: give a prompt")
            prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
            batch_size, cond = len(prompts), codec.encode(prompts)
        elif prompt is not None:
            raise ValueError("this generator takes no prompt (its teacher was not text-to-image)")
        shape = (batch_size, *self.sample_shape())
        z = (randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32) if latents is None
             else latents.to(self.device, torch.float32))
        if class_labels is not None:
            classes = torch.as_tensor(class_labels, device=self.device).reshape(-1).expand(len(z))
            cond = nn.functional.one_hot(classes, denoiser.label_dim).float()
        steps, renoise = num_inference_steps or self.config.steps, self.config.renoise
        noise = ([randn_tensor(z.shape, generator=generator, device=self.device) for _ in range(steps - 1)]
                 if renoise == "fresh" else None)                           # the later steps' fresh noise
        images = generate(denoiser, z, float(self.config.sigma_init), steps, renoise, cond, noise=noise)
        if codec is not None and output_type != "latent":
            images = codec.decode(images)
        if output_type in ("pt", "latent"):
            out = images
        else:
            out = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            out = self.numpy_to_pil(out) if output_type == "pil" else out
        return ImagePipelineOutput(images=out) if return_dict else (out,)


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


def stock_settings(folder: Path, scheduler) -> dict:
    """What a stock-form export says of its generator (``SiDPipeline``'s settings): one step from
    ``generator.json``'s σ_init at its size and prompt length (a stock folder without sid's record beside it is a
    pipeline, not an export), on the scheduler's parameterisation."""
    try:
        record = json.loads((Path(folder) / "generator.json").read_text())
        sigma_init, sample_size, spec = float(record["sigma_init"]), list(record["shape"][1:]), record["denoiser"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SidError(f"{folder} is a stock diffusers pipeline without sid's generator.json beside it: a teacher, "
                       "not an export? Sample a teacher with `sid sample --teacher`") from None
    prediction = prediction_of({**scheduler.config, "_class_name": type(scheduler).__name__})
    return {"sigma_init": sigma_init, "prediction_type": prediction, "sample_size": sample_size,
            "sigma_data": spec.get("sigma_data", 0.5), "max_sequence_length": spec.get("max_sequence_length")}


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
    folder = Path(path)
    folder = folder / "generator" if not (folder / "model_index.json").is_file() else folder
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
        use = "With sid's pipeline class (the teacher's VP or flow schedule around the UNet):\n\n" + pipeline
    return (f"---\nlibrary_name: diffusers\ntags: [sid, one-step, distillation, score-identity-distillation]\n---\n\n"
            f"# One-step generator distilled by sid\n\n"
            f"A one-step generator of {'×'.join(map(str, config['shape']))} samples, distilled data-free from the "
            f"diffusers teacher `{source}` ({unet}, prediction type `{spec.get('prediction_type')}`) with the "
            f"identity-based loss at λ = {config.get('lam')}, after {config.get('nimg', 0):,} generator images"
            f"{'; measured: ' + measured if measured else ''}. G(z) = D(σ_init z; σ_init) with σ_init = "
            f"{config['sigma_init']}{evaluations(config)}.\n\n{use}\n"
            "`generator.safetensors` and `generator.json` beside it hold the same weights for `sid.load_generator`; "
            "the run's whole config is in `generator.json`.\n")
