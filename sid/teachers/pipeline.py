"""Exported generators in diffusers' own form: ``SiDPipeline`` and the export beside sid's files.

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
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler, SchedulerMixin
from torch import nn

from sid.precond import Preconditioned
from sid.teachers.diffusers import denoiser_from_unet, edm_output, model_of, sample_shape
from sid.teachers.latent import ImageCodec, TextCodec, class_denoiser, quiet, text_denoiser


class SiDPipeline(DiffusionPipeline):
    """A one-step generator as a diffusers pipeline: ``SiDPipeline.from_pretrained(folder)(batch_size=4).images``,
    or, distilled from a text-to-image teacher, ``SiDPipeline.from_pretrained(folder)("a photo of a cat").images``.

    ``unet`` is the generator's network, ``scheduler`` the teacher's (its parameterisation); the pipeline's config
    names σ_init, the prediction type and σ_data. One network evaluation: x = D(σ_init z; σ_init, c), with D the
    teacher's coefficient rule around the UNet, as ``sid`` trained it. A text-to-image generator also holds its
    teacher's VAE, text encoder and tokenizer: c is the prompt's encoding and x the latents the VAE decodes.
    """

    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer"]

    def __init__(self, scheduler, unet=None, vae=None, text_encoder=None, tokenizer=None, transformer=None,
                 sigma_init: float = 2.5, prediction_type: str = "edm", sigma_data: float = 0.5):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)
        self.register_to_config(sigma_init=sigma_init, prediction_type=prediction_type, sigma_data=sigma_data)

    @property
    def text_to_image(self) -> bool:
        return self.text_encoder is not None

    def denoiser(self, text: bool | None = None) -> Preconditioned:
        """The generator's network under its coefficient rule; ``text``: whether it reads a text condition
        (default: whether the pipeline holds a text encoder)."""
        config = {k: v for k, v in dict(self.scheduler.config).items()}
        config["_class_name"] = type(self.scheduler).__name__
        if self.transformer is not None:                     # a class-conditional DiT
            return class_denoiser(self.transformer, self.config.prediction_type, config, self.config.sigma_data)
        if self.text_to_image if text is None else text:
            return text_denoiser(self.unet, self.config.prediction_type, config, self.config.sigma_data)
        return denoiser_from_unet(self.unet, self.config.prediction_type, config, self.config.sigma_data)

    def codec(self) -> ImageCodec | None:
        """The VAE (and the text encoder and tokenizer), as the teacher used them (latent generators), or None."""
        if self.text_to_image:
            return TextCodec(self.vae, self.text_encoder, self.tokenizer)
        return ImageCodec(self.vae) if self.vae is not None else None

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, batch_size: int = 1,
                 generator: torch.Generator | None = None, class_labels=None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """``prompt``: one prompt per image (a text-to-image generator; a single one is used ``batch_size`` times);
        ``latents``: the noise z ~ N(0, I) itself, instead of drawing it from ``generator``; ``output_type``:
        ``pil``, ``np``, ``pt`` (images in [-1, 1]) or ``latent`` (a text-to-image generator's latents)."""
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        denoiser, codec = self.denoiser(), self.codec()
        cond = None
        if self.text_to_image:
            if prompt is None:
                raise ValueError("this generator was distilled from a text-to-image teacher: give a prompt")
            prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
            batch_size, cond = len(prompts), codec.encode(prompts)
        elif prompt is not None:
            raise ValueError("this generator takes no prompt (its teacher was not text-to-image)")
        shape = (batch_size, *sample_shape(denoiser))
        z = (randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32) if latents is None
             else latents.to(self.device, torch.float32))
        if class_labels is not None:
            classes = torch.as_tensor(class_labels, device=self.device).reshape(-1).expand(len(z))
            cond = nn.functional.one_hot(classes, denoiser.label_dim).float()
        sigma = torch.full((len(z),), float(self.config.sigma_init), device=self.device)
        images = denoiser(self.config.sigma_init * z, sigma, cond)
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
    tokenizer) also those, written once (they are frozen: a folder that has them keeps them). For
    EDM-preconditioned teachers the scheduler is a stock one-step ``EDMEulerScheduler`` (σ_min = σ_max = σ_init),
    so diffusers alone reproduces the generator; otherwise ``SiDPipeline`` does."""
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
    slot = "transformer" if spec.get("pipeline") == "DiTPipeline" else "unet"
    pipeline = SiDPipeline(**{slot: model}, scheduler=scheduler, **(components or {}), sigma_init=sigma_init,
                           prediction_type=spec["prediction_type"], sigma_data=denoiser.sigma_data)
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


UNETS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


def load_native(folder: Path) -> tuple[Preconditioned, tuple[int, ...], float]:
    """(denoiser, sample shape, σ_init) of a diffusers-form export alone (``model_index.json``, ``unet/``,
    ``scheduler/``), for ``sid.load_generator``. Its components are loaded by the classes its index names only
    where those are diffusers' own UNets and schedulers: an index cannot make this import or run other code."""
    from sid.errors import SidError

    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        slot = "transformer" if (index.get("transformer") or [None])[0] else "unet"
        unet_lib, unet_name = index[slot]
        scheduler_lib, scheduler_name = index["scheduler"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SidError(f"{folder / 'model_index.json'} is not the index of a sid export ({type(e).__name__}); "
                       "export it again") from None
    scheduler_cls = getattr(diffusers, scheduler_name, None) if scheduler_lib == "diffusers" else None
    if (index.get("_class_name") != "SiDPipeline" or unet_lib != "diffusers" or unet_name not in UNETS
            or not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin))):
        raise SidError(f"{folder} is a diffusers folder, but not a sid export (SiDPipeline with a diffusers UNet and "
                       "scheduler); give the folder sid exported")
    try:
        unet = getattr(diffusers, unet_name).from_pretrained(folder / slot, use_safetensors=True)
        scheduler = scheduler_cls.from_pretrained(folder / "scheduler")
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"{folder}: its unet/ or scheduler/ cannot be loaded ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:160]}); export it again") from None
    settings = {k: index[k] for k in ("sigma_init", "prediction_type", "sigma_data") if k in index}
    text = (index.get("text_encoder") or [None])[0] is not None          # its backbone reads the text condition
    pipeline = SiDPipeline(**{slot: unet}, scheduler=scheduler, **settings)
    denoiser = pipeline.denoiser(text)
    return denoiser, sample_shape(denoiser), float(pipeline.config.sigma_init)


def write_card(folder: Path, config: dict) -> None:
    """The model card of an export, written beside and renamed (a reader never sees half of one)."""
    tmp = Path(folder) / ".README.md.tmp"
    tmp.write_text(model_card(config))
    os.replace(tmp, Path(folder) / "README.md")


def model_card(config: dict) -> str:
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
    call = '"a photo of a cat", batch_size=4' if spec.get("pipeline") else "batch_size=4"
    pipeline = ("```python\nfrom sid import SiDPipeline\n\n"
                f'images = SiDPipeline.from_pretrained("path/to/this/folder")({call}).images      # PIL images\n'
                "```\n")
    if spec.get("prediction_type") == "edm":
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
            f"{config['sigma_init']}: one network evaluation per sample.\n\n{use}\n"
            "`generator.safetensors` and `generator.json` beside it hold the same weights for `sid.load_generator`; "
            "the run's whole config is in `generator.json`.\n")
