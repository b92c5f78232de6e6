"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): a text-conditioned ``UNet2DConditionModel`` reading one
CLIP's last hidden states."""

from __future__ import annotations

import torch
from torch import nn

from sid.teachers.diffusers.codecs import TextCodec
from sid.teachers.diffusers.family import Family, context, encoder


class TextUNetBackbone(nn.Module):
    """``F(x_in, c_noise, cond)`` over a text-conditioned ``UNet2DConditionModel``: cond["text"] is its
    ``encoder_hidden_states``; SDXL's UNet also reads cond["pooled"] and cond["time_ids"] (``added_cond_kwargs``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.added = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> torch.Tensor:
        unet = self.unet
        added = None
        if self.added:
            added = {"text_embeds": context(cond, "pooled", unet, "SDXL"),
                     "time_ids": context(cond, "time_ids", unet, "SDXL")}
        return unet(x_in.to(unet.dtype), c_noise,
                    encoder_hidden_states=context(cond, "text", unet, "text-conditioned UNet"),
                    added_cond_kwargs=added, return_dict=False)[0]


class SDCodec(TextCodec):
    """Stable Diffusion's encoding (``StableDiffusionPipeline.encode_prompt``): one CLIP's last hidden states."""

    def encode_text(self, prompts: list[str]) -> dict:
        return {"text": self.run("text_encoder", self.tokens("tokenizer", prompts).input_ids)[0]}


FAMILIES = (Family("StableDiffusionPipeline", "unet", "UNet2DConditionModel", TextUNetBackbone, SDCodec, encoder(1)),)
