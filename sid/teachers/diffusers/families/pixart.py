"""PixArt-α and PixArt-Σ (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``): a ``PixArtTransformer2DModel`` reading
T5's states with their mask; learned variance dropped."""

from __future__ import annotations

import torch
from torch import nn

from sid.teachers.diffusers.codecs import TextCodec
from sid.teachers.diffusers.family import Family, context, encoder, eps_channels, working_device


class PixArtBackbone(nn.Module):
    """``F(x_in, c_noise, cond)`` over a ``PixArtTransformer2DModel``: cond["text"] and cond["mask"] are T5's states
    and attention mask; a 1024-px PixArt-α also reads cond["resolution"] and cond["aspect_ratio"]. A learned-variance
    output keeps its ε channels."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> torch.Tensor:
        net = self.transformer
        added = {"resolution": None, "aspect_ratio": None}
        if net.use_additional_conditions:
            added = {k: context(cond, k, net, "1024-px PixArt-α") for k in added}
        out = net(x_in.to(net.dtype), encoder_hidden_states=context(cond, "text", net, "PixArt"),
                  encoder_attention_mask=context(cond, "mask", net, "PixArt"), timestep=c_noise,
                  added_cond_kwargs=added, return_dict=False)[0]
        return eps_channels(out, x_in)


class PixArtCodec(TextCodec):
    """PixArt-α's encoding (``PixArtAlphaPipeline.encode_prompt``, captions as given: its optional caption cleaning
    is not applied): T5's states over ``max_sequence_length`` tokens with their attention mask; a 1024-px PixArt-α
    also gets the image's resolution and aspect ratio."""

    max_sequence_length = 120                      # PixArt-α's pipeline default

    @classmethod
    def build(cls, vae, parts, model, index, image_size):
        height, width = image_size
        micro = {"resolution": [height, width], "aspect_ratio": [height / width]}
        return cls(vae, parts, micro if model is not None and model.use_additional_conditions else None)

    def encode_text(self, prompts: list[str]) -> dict:
        tokens = self.tokens("tokenizer", prompts, self.max_sequence_length)
        mask = tokens.attention_mask
        text = self.run("text_encoder", tokens.input_ids,
                        attention_mask=mask.to(working_device(self.parts["text_encoder"])))
        return {"text": text[0], "mask": mask.to(text[0].device)}


class PixArtSigmaCodec(PixArtCodec):
    """PixArt-Σ's encoding: as PixArt-α's, over 300 tokens (its pipeline's default)."""

    max_sequence_length = 300


FAMILIES = (Family("PixArtAlphaPipeline", "transformer", "PixArtTransformer2DModel", PixArtBackbone, PixArtCodec,
                   encoder(1)),
            Family("PixArtSigmaPipeline", "transformer", "PixArtTransformer2DModel", PixArtBackbone, PixArtSigmaCodec,
                   encoder(1)))
