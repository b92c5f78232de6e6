"""What every teacher of this adapter shares: the diffusers model inside a denoiser, the spec that rebuilds its
architecture, and ``DiffusersTeacher``, whose networks checkpoint and take LoRA adapters as diffusers models do."""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from torch import nn

from sid.precond import Preconditioned
from sid.teachers.base import Teacher


def model_of(denoiser: Preconditioned) -> nn.Module:
    """The diffusers model inside a denoiser of this adapter: its UNet, or its transformer."""
    net = denoiser.net
    return net.unet if hasattr(net, "unet") else net.transformer


def own_shape(model: nn.Module) -> tuple[int, int, int]:
    """One sample's shape at a diffusers model's own size: (channels, height, width) of its config."""
    size = model.config.sample_size
    return (model.config.in_channels, *((size, size) if isinstance(size, int) else size))


def working_device(module: nn.Module) -> torch.device:
    """Where a network computes: the execution device of its offloading hooks (accelerate's, which keep the weights
    elsewhere, even on the meta device, between calls), else its parameters' device."""
    for part in module.modules():
        device = getattr(getattr(part, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(module.parameters()).device


def spec_of(denoiser: Preconditioned, prediction_type: str, scheduler_config: dict | None,
            pipeline: str | None = None) -> dict:
    """What rebuilds this denoiser's architecture without the weights (stored with exported generators); a latent
    pipeline's also names the pipeline, whose family's backbone wraps the model."""
    model = model_of(denoiser)
    spec = {
        "kind": "diffusers",
        "class_name": type(model).__name__,
        "unet_config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "prediction_type": prediction_type,
        "scheduler_config": scheduler_config,
        "sigma_data": denoiser.sigma_data,
    }
    return {**spec, "pipeline": pipeline} if pipeline else spec


def checkpoint_blocks(net: nn.Module) -> None:
    """``perf.grad_checkpointing`` for a network holding diffusers models: their own checkpointing, block by block
    (``enable_gradient_checkpointing``)."""
    for module in net.modules():
        if isinstance(module, ModelMixin):
            module.enable_gradient_checkpointing()


class DiffusersTeacher(Teacher):
    """A teacher whose network is a diffusers model: activation checkpointing is the model's own, block by block,
    and LoRA adapters go on the model itself (keys as diffusers and peft name them for it)."""

    def checkpoint_activations(self, net: nn.Module) -> None:
        checkpoint_blocks(net)

    def lora_target(self, net: nn.Module) -> nn.Module:
        return model_of(net)
