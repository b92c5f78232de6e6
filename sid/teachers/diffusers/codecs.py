"""The frozen parts of a latent pipeline around its network: the VAE (latents -> images) and, for text-to-image
families, the tokenizers and text encoders (prompts -> conditions). A family module subclasses ``TextCodec`` with
its pipeline's own ``encode_prompt``."""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch
from torch import nn

from sid.checkpoint import tensors_checksum
from sid.teachers.diffusers.models import working_device


def vae_factor(config) -> int:
    """How many pixels one latent spans: 2^(levels − 1) of the VAE's config (an AutoencoderKL's block channels,
    an AutoencoderDC's encoder's), as the pipelines compute it."""
    levels = config.get("block_out_channels") or config.get("encoder_block_out_channels") or [0] * 4
    return 2 ** (len(levels) - 1)


class ImageCodec:
    """The frozen VAE of a latent pipeline: latents -> images, as the pipeline decodes them."""

    text_to_image = False

    def __init__(self, vae):
        self.vae = None if vae is None else vae.eval().requires_grad_(False)  # None: a pipeline's text part alone
        self.scaling_factor = float(vae.config.scaling_factor) if vae is not None else 1.0
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0) if vae is not None else 0.0
        self.visit = None                      # offloaded: the device the networks visit to work, else None

    @classmethod
    def build(cls, vae, parts: dict, model: nn.Module, index: dict, image_size: tuple[int, int]) -> ImageCodec:
        """The codec of a pipeline folder's ``vae`` and text ``parts`` around its network ``model``, for images of
        ``image_size`` (height, width); text families read more of them."""
        return cls(vae)

    def offload(self, device) -> None:
        """Keep the networks on the CPU; each encode or decode moves them to ``device`` and back."""
        self.to("cpu")
        self.visit = torch.device(device)

    @contextlib.contextmanager
    def working(self):
        """The networks on their working device for the duration (offloaded: there and back)."""
        if self.visit is None:
            yield
            return
        for net in self.networks():
            net.to(self.visit)
        try:
            yield
        finally:
            for net in self.networks():
                net.to("cpu")

    def components(self) -> dict:
        return {"vae": self.vae}

    def networks(self) -> tuple:
        return tuple(v for v in self.components().values() if isinstance(v, nn.Module))

    def to(self, device=None, dtype: torch.dtype | None = None):
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for net in self.networks():
            net.to(**moves)
        return self

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE, as the pipeline decodes them."""
        vae = self.vae
        with self.working():
            z = latents.to(working_device(vae), vae.dtype) / self.scaling_factor + self.shift_factor
            return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents as the pipeline scales them, (z − shift) · scaling, z the mean of the VAE's
        posterior (deterministic, so a resumed run reads the same latents; a VAE without a posterior, such as
        Sana's autoencoder, gives its latent)."""
        vae = self.vae
        with self.working():
            encoded = vae.encode(images.to(working_device(vae), vae.dtype), return_dict=False)[0]
            z = encoded.mean if hasattr(encoded, "mean") and not torch.is_tensor(encoded) else encoded
            return ((z - self.shift_factor) * self.scaling_factor).float()


class TextCodec(ImageCodec):
    """The frozen parts of a latent text-to-image pipeline around its denoiser: its tokenizers and text encoders
    (prompts -> conditions) and the VAE (latents -> images). The teacher and an exported ``SiDPipeline`` use the
    same one, so a generator's images are decoded as its teacher's are.

    Each family's subclass gives ``encode_text``, its pipeline's ``encode_prompt``. ``micro`` holds per-image
    constants every condition carries (SDXL's time ids, PixArt-α's size), the same for the null condition, as the
    pipelines pass them.
    """

    text_to_image = True
    max_sequence_length: int | None = None         # families with T5 or Gemma: the tokens of a prompt they encode

    def __init__(self, vae, parts: dict, micro: dict | None = None):
        super().__init__(vae)
        self.parts = {k: v.eval().requires_grad_(False) if isinstance(v, nn.Module) else v
                      for k, v in parts.items() if v is not None}
        self.micro = {k: torch.as_tensor(v, dtype=torch.float32).reshape(1, -1) for k, v in (micro or {}).items()}
        self._null = None

    @classmethod
    def build(cls, vae, parts, model, index, image_size) -> TextCodec:
        return cls(vae, parts)

    def components(self) -> dict:
        return {"vae": self.vae, **self.parts}

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextCodec:
        self._null = None
        return super().to(device, dtype)

    def tokens(self, name: str, prompts: list[str], length: int | None = None):
        """The tokenizer ``name``'s encoding of ``prompts``, padded to ``length`` (default: its own), truncated."""
        tokenizer = self.parts[name]
        return tokenizer(prompts, padding="max_length", max_length=length or tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")

    def run(self, name: str, ids: torch.Tensor, **kwargs):
        """The text encoder ``name`` on token ids (on its device)."""
        encoder = self.parts[name]
        return encoder(ids.to(working_device(encoder)), **kwargs)

    def clip(self, suffix: str, prompts: list[str]):
        """(penultimate hidden states, first output) of the CLIP text encoder ``text_encoder{suffix}``, as SDXL
        and SD3 read them (``output_hidden_states``; clip_skip unset); the first output of a
        ``...WithProjection`` model is its pooled projection."""
        out = self.run(f"text_encoder{suffix}", self.tokens(f"tokenizer{suffix}", prompts).input_ids,
                       output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def encode_text(self, prompts: list[str]) -> dict:
        """The condition of each prompt, as the family's pipeline makes it (its ``encode_prompt``)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: list[str], text=None) -> dict:
        """Prompts -> their conditions (floating values in float32), with the micro-conditioning constants;
        ``text``: the encoding to use (default: ``encode_text``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self.working():
            cond = (text or self.encode_text)(prompts)
        cond = {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}
        device = next(iter(cond.values())).device
        return {**cond, **{k: v.to(device).expand(len(prompts), -1) for k, v in self.micro.items()}}

    def null(self) -> dict:
        """The null condition of one image: the empty prompt's encoding."""
        return self.encode([""])

    def null_condition(self, n: int) -> dict:
        """The null condition ``n`` times: the unconditional half of the pipeline's guidance."""
        if self._null is None:
            self._null = self.null()
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def fingerprint(self) -> str:
        """What identifies the encoding: each tokenizer (class, length, vocabulary size) and text encoder (class,
        config, every weight), and the micro-conditioning, as a SHA-256 (an embeddings cache names the encoders it
        was made with)."""
        described = []
        for name, part in sorted(self.parts.items()):
            if isinstance(part, nn.Module):
                described.append([name, type(part).__name__, part.config.to_dict(),
                                  tensors_checksum(part.state_dict())])
            else:
                described.append([name, type(part).__name__, part.model_max_length, len(part)])
        described.append({k: v.tolist() for k, v in self.micro.items()})
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
