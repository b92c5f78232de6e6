"""What the trainer may know of a teacher: the ``Teacher`` bundle, the one face every adapter returns."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from sid.errors import SidError
from sid.guidance import guided
from sid.networks import MLP
from sid.precond import Preconditioned


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device: made under torch's meta device context, then moved there. The move catches
    buffers the context leaves on the CPU once transformers (5.x) has built a model inside a device context while
    torch's constructors were wrapped: torch fixes its set of device-aware constructors at its first use in a
    process, and from then on ``torch.linspace`` and others ignore a device context."""
    with torch.device("meta"):
        return build().to("meta")


class Teacher:
    """A pretrained model under the denoiser contract, and what its family can do.

    Holds the frozen denoiser f_φ (eval mode, no parameter gradients), one sample's shape, and a ``spec``: a
    JSON-able description of the students' architecture, from which exported generators are rebuilt without
    the training code (``sid.teachers.denoiser_from_spec``). The trainer asks this object, never the network:
    adapters subclass it where their family differs (exact samples, student initialisation, activation
    checkpointing).
    """

    exact_samples = False               # whether ``sample`` draws exact samples of the teacher's distribution
    text_to_image = False               # conditioned on prompts (``encode``), working on latents (``decode``)

    def __init__(self, denoiser: nn.Module, shape, spec: dict, augment_dim: int = 0, zero_label_is_null=False):
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.shape, self.spec = tuple(int(s) for s in shape), spec
        self.augment_dim = augment_dim  # augmentation labels its network takes (``loss.augment``); 0: none
        self.zero_label_is_null = zero_label_is_null   # the zero one-hot vector means "no class" (guidance)

    @property
    def label_dim(self) -> int:
        return self.denoiser.label_dim

    @property
    def points(self) -> bool:
        """Whether one sample is a 2-D point (pictured as a scatter over the teacher's samples), not an image."""
        return self.shape == (2,)

    def null_condition(self, n: int):
        """The family's null condition for ``n`` samples, which guidance's unconditional half sees, or None
        where the teacher has none (unconditional, or never trained without its condition). For one-hot class
        labels it is the zero vector where ``zero_label_is_null`` (EDM's networks learn it by label dropout;
        a diffusers class-embedding UNet has no such class). Families with other conditions override it."""
        if self.label_dim and self.zero_label_is_null:
            return torch.zeros(n, self.label_dim)                      # moved to the batch's device where used
        return None

    def sampling_sigmas(self, steps: int) -> torch.Tensor | None:
        """The noise levels of the teacher's own sampling schedule of ``steps`` steps (ending with 0), or None for
        EDM's Karras schedule."""
        return None

    def guide(self, denoiser, scale: float):
        """``denoiser`` (the teacher's, or a student of its architecture) under guidance of strength κ as this
        teacher is guided: classifier-free guidance against its null condition (``guidance.guided``)."""
        return guided(denoiser, scale, self.null_condition)

    def to(self, device, denoiser: bool = True) -> Teacher:
        """Move the teacher's networks (the denoiser, unless ``denoiser=False``: a sharded run splits it first, and
        a family's encoders) to ``device``."""
        if denoiser:
            self.denoiser.to(device)
        return self

    def timestep_sigmas(self) -> torch.Tensor | None:
        """σ of each of the teacher's own training timesteps (discrete schedules, on its device), or None."""
        return self.denoiser.rule.timestep_sigmas() if isinstance(self.denoiser, Preconditioned) else None

    def training_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) of the teacher's own training loss on Σ (D − x0)² (``Rule.training_weight``)."""
        if not isinstance(self.denoiser, Preconditioned):
            raise SidError(f"this {self.spec['kind']} teacher's training loss is unknown: use loss.fake_loss=edm")
        return self.denoiser.rule.training_weight(sigma)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples -> images (sample grids, FID): the samples themselves, except for latent families."""
        return x

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One sample as an image, (C, H, W) as ``decode`` returns it: the sample's own shape, except for latent
        families."""
        return self.shape

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of ``image_shape`` -> samples the denoiser works on (real images, ``data.source``):
        the images themselves, except for latent families."""
        return images

    def encoder_end(self, net: nn.Module) -> nn.Module | None:
        """The last block of ``net``'s encoder (a network of this family: the teacher or a student, LoRA or
        sharded), whose output feeds the middle of a UNet, or None where the network has no such place. SiDA's
        logit is the channel mean of its output: the last ``enc`` block of EDM's SongUNet and DhariwalUNet, a
        diffusers UNet's last down block, and for the MLP of analytic teachers its middle hidden layer."""
        for module in net.modules():
            blocks = getattr(module, "enc", None)
            if isinstance(blocks, nn.ModuleDict) and len(blocks):
                return list(blocks.values())[-1]
            blocks = getattr(module, "down_blocks", None)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return blocks[-1]
            if isinstance(module, MLP):
                hidden = [m for m in module.body if isinstance(m, nn.SiLU)]
                return hidden[(len(hidden) - 1) // 2] if hidden else None
        return None

    def components(self) -> dict | None:
        """The frozen networks an export carries beside the generator (a latent family's VAE and encoders)."""
        return None

    def offload_codec(self, device) -> None:
        """``perf.offload_codec``: a latent family's frozen encoders and VAE on the CPU between uses (else none)."""

    def make_student(self) -> nn.Module:
        """A trainable denoiser that starts as the teacher (the fake score and the generator): a copy of it."""
        return copy.deepcopy(self.denoiser).train().requires_grad_(True)

    def lora_target(self, net: nn.Module) -> nn.Module:
        """Where a LoRA student's adapters go (``lora.targets`` name modules inside it): the backbone of a
        denoiser of this family; adapter keys are relative to it."""
        return net.net if isinstance(net, Preconditioned) else net

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples of the teacher's distribution, where ``exact_samples`` says it has them."""
        raise SidError(f"a {self.spec['kind']} teacher has no exact samples; sample it with `sid sample --teacher`")

    def checkpoint_activations(self, net: nn.Module) -> None:
        """``perf.grad_checkpointing`` for a network of this family (the teacher or a student): each backbone is
        recomputed whole in backward. Adapters whose networks checkpoint block by block override it."""
        for module in net.modules():
            if isinstance(module, Preconditioned):
                module.grad_checkpointing = True

    def store_frozen(self, dtype: torch.dtype) -> None:
        """Keep the frozen teacher's backbone weights in ``dtype`` (``perf.teacher_bf16``); its coefficient rule,
        and so the denoiser's inputs and outputs, stay float32 (``sid/precond.py``)."""
        if isinstance(self.denoiser, Preconditioned):
            self.denoiser.net.to(dtype)
