"""Latent, text-conditioned diffusers pipelines (Stable Diffusion 1.x / 2.x): the pipeline's UNet under the
denoiser contract in latent space, with the pipeline's own VAE, text encoder and tokenizer.

Part of the diffusers adapter (``teacher.kind=diffusers``): a folder whose ``model_index.json`` names one of
its ``LATENT_PIPELINES`` is read here. The condition is ``{"text": encoder_hidden_states}`` (batch first), the null
condition the empty prompt's encoding, as the pipeline's classifier-free guidance uses it; the VAE turns
latents into images with the pipeline's scaling factor (and shift, where its config has one). Weights only are
read (safetensors, or torch files read weights-only, as diffusers does).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sid.errors import SidError
from sid.precond import Preconditioned
from sid.teachers.base import Teacher

# Pipelines this module reads (``diffusers.LATENT_PIPELINES``), each with the components it needs.
COMPONENTS = {"StableDiffusionPipeline": ("unet", "scheduler", "vae", "text_encoder", "tokenizer")}


class TextUNetBackbone(nn.Module):
    """``F(x_in, c_noise, cond)`` over a text-conditioned ``UNet2DConditionModel``: cond["text"] is the encoder's
    last hidden states, the UNet's ``encoder_hidden_states``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> torch.Tensor:
        if not isinstance(cond, dict) or "text" not in cond:
            raise SidError("a text-conditioned UNet needs a condition {'text': encoder hidden states}; encode "
                           "prompts with the teacher's encode()")
        context = cond["text"].to(x_in.device, self.unet.dtype)
        return self.unet(x_in, c_noise, encoder_hidden_states=context, return_dict=False)[0]


class LatentTextTeacher(Teacher):
    """A latent text-to-image teacher: the denoiser works on latents of ``shape``; ``encode`` turns prompts into
    conditions, ``decode`` latents into images in [-1, 1] (sample grids, FID, export; never the training step).
    The VAE and text encoder are frozen."""

    text_to_image = True

    def __init__(self, denoiser: Preconditioned, shape, spec: dict, vae, text_encoder, tokenizer):
        super().__init__(denoiser, shape, spec)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._null = None

    def to(self, device) -> LatentTextTeacher:
        for net in (self.denoiser, self.vae, self.text_encoder):
            net.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict:
        """The condition of each prompt: the text encoder's last hidden states over the tokens padded to the
        tokenizer's length, as the pipeline encodes them (``StableDiffusionPipeline.encode_prompt``)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(tokens.input_ids.to(device))[0]
        return {"text": hidden.float()}

    def null_condition(self, n: int) -> dict:
        """The empty prompt's encoding, ``n`` times: the unconditional half of the pipeline's guidance."""
        if self._null is None:
            self._null = self.encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE, as the pipeline decodes them."""
        vae = self.vae
        z = latents.to(next(vae.parameters()).device, vae.dtype) / self.scaling_factor + self.shift_factor
        return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)


def load(root: Path, index: dict) -> LatentTextTeacher:
    """The teacher of a latent text-to-image pipeline folder (``LATENT_PIPELINES``), with one line for a missing
    or unreadable component."""
    import diffusers

    from sid.teachers.diffusers import DiscreteVPRule, _read_json, sample_shape, spec_of

    name = index.get("_class_name")
    try:
        import transformers
    except ImportError:
        raise SidError(f"{root} is a {name}, whose text encoder needs transformers: pip install "
                       "'sid-distill[text]' (or transformers)") from None
    missing = [c for c in COMPONENTS[name] if not (root / c).is_dir()]
    if missing:
        raise SidError(f"teacher folder {root} is a {name} without {', '.join(missing)}/; a {name} folder needs "
                       f"{', '.join(COMPONENTS[name])} (save the whole pipeline with save_pretrained)")
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json") or {}
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise SidError(f"{root}: a {name} whose scheduler predicts {prediction_type!r}; supported: epsilon, "
                       "v_prediction")
    quiet = not transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()        # one line per component is noise in a log
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
        vae = diffusers.AutoencoderKL.from_pretrained(root / "vae")
        text_encoder = _component(transformers, root, "text_encoder", index)
        tokenizer = _component(transformers, root, "tokenizer", index)
        alphas_cumprod = diffusers.DDPMScheduler.from_config(scheduler_config).alphas_cumprod
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"cannot load the {name} in {root}: {(str(e).splitlines() or [''])[0][:200]}") from None
    finally:
        if not quiet:
            transformers.utils.logging.enable_progress_bar()
    denoiser = Preconditioned(TextUNetBackbone(unet), DiscreteVPRule(alphas_cumprod, prediction_type))
    spec = {**spec_of(denoiser, prediction_type, scheduler_config), "pipeline": name}
    return LatentTextTeacher(denoiser, sample_shape(denoiser), spec, vae, text_encoder, tokenizer)


def _component(transformers, root: Path, name: str, index: dict):
    """A text encoder or tokenizer by the class its index names, from transformers only (no other code)."""
    library, cls = (index.get(name) or [None, None])[:2]
    model = getattr(transformers, cls or "", None) if library == "transformers" else None
    if model is None:
        raise SidError(f"{root}: its {name} is {library}.{cls}; a transformers text encoder and tokenizer are "
                       "needed")
    return model.from_pretrained(root / name)
