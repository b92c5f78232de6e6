"""What a latent family module gives: a ``Family`` row (the pipeline class, its network, a backbone that hands the
network its condition, a codec), and the helpers its backbone uses. Registered in ``families/__init__.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sid.errors import SidError
from sid.teachers.diffusers.codecs import ImageCodec
from sid.teachers.diffusers.models import own_shape, working_device


@dataclass(frozen=True)
class Family:
    """What sid reads of a latent pipeline folder whose ``model_index.json`` names ``pipeline``."""

    pipeline: str              # the diffusers pipeline class
    network: str               # the component holding the network: unet or transformer
    model: str                 # its diffusers class
    backbone: type             # F(x_in, c_noise, cond) over it
    codec: type = ImageCodec   # the frozen VAE (and text encoders) around it
    encoders: tuple = ()       # text encoder and tokenizer components
    optional: tuple = ()       # of those, the ones a folder may leave out (null in its index)

    @property
    def text_to_image(self) -> bool:
        return bool(self.encoders)

    def components(self) -> tuple:
        """The components a folder of this pipeline needs (hub ids: the ones fetched)."""
        return (self.network, "scheduler", "vae", *self.encoders)

    def channels(self, config) -> int:
        """The latents' channels, from the network's config."""
        return config.get("in_channels")

    def flow_times(self, scheduler, steps: int, shape) -> torch.Tensor:
        """The flow times (from 1, then 0 appended) the pipeline's flow-matching Euler ``scheduler`` steps through in
        ``steps`` steps for latents of ``shape``, as its ``__call__`` sets them (SD3: the scheduler's own spacing)."""
        scheduler.set_timesteps(steps)
        return scheduler.sigmas

    def latent_shape(self, model: nn.Module, factor: int, resolution: int | None = None) -> tuple[int, int, int]:
        """One latent's shape: (channels, height, width) at the network's own sample size, or for square images of
        ``resolution`` pixels (a multiple of the VAE's ``factor`` × the network's patch size)."""
        if resolution is None:
            return own_shape(model)
        config = model.config
        step = factor * int(getattr(config, "patch_size", None) or 1)
        if resolution % step:
            raise SidError(f"teacher.diffusers.resolution={resolution} must be a multiple of {step} for this "
                           f"pipeline (its VAE's factor {factor} × its patch size)")
        return (self.channels(config), resolution // factor, resolution // factor)


def encoder(n: int = 1) -> tuple[str, str]:
    """The components of a pipeline's ``n``-th text encoder and its tokenizer (``text_encoder_2``, ``tokenizer_2``
    for n = 2), as diffusers' pipelines name them."""
    suffix = "" if n == 1 else f"_{n}"
    return f"text_encoder{suffix}", f"tokenizer{suffix}"


def context(cond, key: str, model: nn.Module, family: str) -> torch.Tensor:
    """``cond[key]`` on the model's device, floating values in its dtype; one line when the condition lacks it."""
    if not isinstance(cond, dict) or key not in cond:
        raise SidError(f"a {family} network needs a condition with {key!r}; encode prompts with the teacher's "
                       "encode()")
    value = cond[key].to(working_device(model))
    return value.to(model.dtype) if value.is_floating_point() else value


def eps_channels(out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """A learned-variance output (2C channels: ε, then the variance) keeps its ε channels, as the pipelines do."""
    return out[:, :x_in.shape[1]]
