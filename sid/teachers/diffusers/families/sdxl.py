"""Stable Diffusion XL (``StableDiffusionXLPipeline``): SD's text UNet with SDXL's added conditions, two CLIPs."""

from __future__ import annotations

import torch

from sid.teachers.diffusers.codecs import TextCodec
from sid.teachers.diffusers.families.sd import TextUNetBackbone
from sid.teachers.diffusers.family import Family, encoder


class SDXLCodec(TextCodec):
    """Stable Diffusion XL's encoding (``StableDiffusionXLPipeline.encode_prompt``): both CLIPs' penultimate states
    side by side, the second's pooled projection, and the time ids (original size, crop corner, target size) of
    the image size; the null condition zeros where ``force_zeros_for_empty_prompt`` (SDXL base's default)."""

    def __init__(self, vae, parts: dict, micro: dict | None = None, zero_null: bool = True):
        super().__init__(vae, parts, micro)
        self.zero_null = zero_null

    @classmethod
    def build(cls, vae, parts, model, index, image_size):
        height, width = image_size
        return cls(vae, parts, {"time_ids": [height, width, 0, 0, height, width]},
                   zero_null=bool(index.get("force_zeros_for_empty_prompt", True)))

    def encode_text(self, prompts: list[str]) -> dict:
        states, pooled = [], None
        for suffix in ("", "_2"):
            if f"text_encoder{suffix}" in self.parts:
                hidden, first = self.clip(suffix, prompts)
                states.append(hidden)
                pooled = first if first.ndim == 2 else pooled          # the last encoder with a projection
        return {"text": torch.cat(states, dim=-1), "pooled": pooled}

    def null(self) -> dict:
        cond = self.encode([""])
        if self.zero_null:
            cond.update({k: torch.zeros_like(cond[k]) for k in ("text", "pooled")})
        return cond


FAMILIES = (Family("StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", TextUNetBackbone, SDXLCodec,
                   (*encoder(1), *encoder(2)), optional=encoder(1)),)
