"""Exported generators in diffusers' own form: ``SiDPipeline`` and the export beside sid's files.

A generator distilled from a diffusers UNet teacher is written as a diffusers pipeline folder (``unet/``,
``scheduler/``, ``model_index.json``, a model card). Where the teacher is EDM-preconditioned the scheduler is a
stock one-step ``EDMEulerScheduler`` and diffusers alone reproduces the generator; in every case
``SiDPipeline.from_pretrained(folder)`` does, offline, with no training code.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler, SchedulerMixin
from torch import nn

from sid.precond import Preconditioned
from sid.teachers.diffusers import EDM_SCHEDULERS, denoiser_from_unet, sample_shape


class SiDPipeline(DiffusionPipeline):
    """A one-step generator as a diffusers pipeline: ``SiDPipeline.from_pretrained(folder)(batch_size=4).images``.

    ``unet`` is the generator's network, ``scheduler`` the teacher's (its parameterisation); the pipeline's config
    names σ_init, the prediction type and σ_data. One network evaluation: x = D(σ_init z; σ_init), with D the
    teacher's coefficient rule around the UNet, as ``sid`` trained it.
    """

    def __init__(self, unet, scheduler, sigma_init: float = 2.5, prediction_type: str = "edm",
                 sigma_data: float = 0.5):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(sigma_init=sigma_init, prediction_type=prediction_type, sigma_data=sigma_data)

    def denoiser(self) -> Preconditioned:
        config = {k: v for k, v in dict(self.scheduler.config).items()}
        config["_class_name"] = type(self.scheduler).__name__
        return denoiser_from_unet(self.unet, self.config.prediction_type, config, self.config.sigma_data)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | None = None, class_labels=None,
                 output_type: str = "pil", return_dict: bool = True):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        denoiser = self.denoiser()
        shape = (batch_size, *sample_shape(denoiser))
        z = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        labels = None
        if class_labels is not None:
            classes = torch.as_tensor(class_labels, device=self.device).reshape(-1).expand(batch_size)
            labels = nn.functional.one_hot(classes, denoiser.label_dim).float()
        sigma = torch.full((batch_size,), float(self.config.sigma_init), device=self.device)
        images = denoiser(self.config.sigma_init * z, sigma, labels)
        if output_type == "pt":
            out = images
        else:
            out = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            out = self.numpy_to_pil(out) if output_type == "pil" else out
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def export_native(denoiser: Preconditioned, spec: dict, sigma_init: float, out_dir: Path, card: str) -> None:
    """The generator in diffusers' form beside sid's files: ``unet/``, ``scheduler/``, ``model_index.json`` and a
    model card. For EDM-preconditioned teachers the scheduler is a stock one-step ``EDMEulerScheduler``
    (σ_min = σ_max = σ_init), so diffusers alone reproduces the generator; otherwise ``SiDPipeline`` does."""
    out_dir = Path(out_dir)
    unet = denoiser.net.unet
    if spec["prediction_type"] == "edm":
        edm = spec.get("scheduler_config") or {}
        output = edm.get("prediction_type", "epsilon") if edm.get("_class_name") in EDM_SCHEDULERS else "epsilon"
        scheduler = EDMEulerScheduler(sigma_min=sigma_init, sigma_max=sigma_init, sigma_data=denoiser.sigma_data,
                                      prediction_type=output)
    else:
        config = spec.get("scheduler_config") or {"_class_name": "DDPMScheduler"}
        cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), None)
        cls = cls if isinstance(cls, type) and issubclass(cls, SchedulerMixin) else diffusers.DDPMScheduler
        scheduler = cls.from_config(config)
    pipeline = SiDPipeline(unet=unet, scheduler=scheduler, sigma_init=sigma_init,
                           prediction_type=spec["prediction_type"], sigma_data=denoiser.sigma_data)
    tmp = out_dir / ".tmp-diffusers"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").write_text(card)
    for name in ("unet", "scheduler"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
        os.replace(tmp / name, out_dir / name)
    for name in ("model_index.json", "README.md"):
        os.replace(tmp / name, out_dir / name)
    shutil.rmtree(tmp, ignore_errors=True)
