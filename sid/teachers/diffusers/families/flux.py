"""FLUX.1 (``FluxPipeline``): the ``FluxTransformer2DModel`` on flow matching over packed latents, CLIP-L's pooled
output and T5-XXL's states; FLUX.1-dev's guidance is an input of the network (its guidance embedding).

Everything outside this module sees ordinary [B, C, H, W] latents (16 channels): the backbone packs each 2×2 patch
into one token of 4C features, with the image's and the text's position ids, and unpacks the velocity it returns,
as ``FluxPipeline`` does around its transformer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sid.errors import SidError
from sid.teachers.diffusers.codecs import TextCodec
from sid.teachers.diffusers.family import Family, context, encoder

DEFAULT_GUIDANCE = 1.0              # the guidance embedding's input when a condition names none (SiD-DiT's generator)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2×2 patch one token, channels first within it
    (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for latents of height ``h`` and width ``w`` (``FluxPipeline._unpack_latents``)."""
    b, _, features = tokens.shape
    c = features // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The position ids of the packed image's tokens: (0, row, column) of each 2×2 patch
    (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3).to(dtype)


class FluxBackbone(nn.Module):
    """``F(x_in, c_noise, cond)`` over a ``FluxTransformer2DModel``: x_in packed into tokens, cond["text"] (T5's
    states) and cond["pooled"] (CLIP's pooled output), zero text position ids; the time input is the flow time
    (c_noise / 1000, which the model scales by 1000 again, as the pipeline feeds it); a guidance-distilled model
    (FLUX.1-dev) reads cond["guidance"], one value per sample (``DEFAULT_GUIDANCE`` where the condition has none)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> torch.Tensor:
        net = self.transformer
        text = context(cond, "text", net, "FLUX")
        _, _, h, w = x_in.shape
        guidance = None
        if net.config.guidance_embeds:
            given = cond.get("guidance") if isinstance(cond, dict) else None
            guidance = (torch.full((len(x_in),), DEFAULT_GUIDANCE, device=x_in.device) if given is None
                        else given.to(x_in.device, torch.float32).reshape(-1).expand(len(x_in)))
        out = net(hidden_states=pack(x_in).to(net.dtype), timestep=c_noise / 1000, guidance=guidance,
                  pooled_projections=context(cond, "pooled", net, "FLUX"), encoder_hidden_states=text,
                  txt_ids=text.new_zeros(text.shape[1], 3), img_ids=image_ids(h, w, x_in.device, text.dtype),
                  return_dict=False)[0]
        return unpack(out, h, w)


class FluxCodec(TextCodec):
    """FLUX's encoding (``FluxPipeline.encode_prompt``, ``prompt_2`` unset): T5's states over
    ``max_sequence_length`` tokens, and the CLIP text encoder's pooled output over its own 77 tokens."""

    max_sequence_length = 512                      # the pipeline's default

    def encode_text(self, prompts: list[str]) -> dict:
        pooled = self.run("text_encoder", self.tokens("tokenizer", prompts).input_ids).pooler_output
        t5 = self.run("text_encoder_2", self.tokens("tokenizer_2", prompts, self.max_sequence_length).input_ids)[0]
        return {"text": t5, "pooled": pooled}


@dataclass(frozen=True)
class PackedFamily(Family):
    """A family whose network reads 2×2 patches of the latents as tokens of 4C features: its config's
    ``in_channels`` is 4C, the latents have C, and their height and width are even."""

    default_size: int = 128        # latents per side when no resolution is given (FluxPipeline: 128, 1024 px)

    def channels(self, config) -> int:
        return config.get("in_channels") // 4

    def flow_times(self, scheduler, steps: int, shape) -> torch.Tensor:
        """``FluxPipeline.__call__``'s: sigmas linspace(1, 1/steps), shifted by μ of the image's token count where the
        scheduler shifts by resolution (``use_dynamic_shifting``: FLUX.1-dev)."""
        config, tokens = scheduler.config, (shape[1] // 2) * (shape[2] // 2)
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
        return scheduler.sigmas

    def latent_shape(self, model: nn.Module, factor: int, resolution: int | None = None) -> tuple[int, int, int]:
        resolution = resolution or self.default_size * factor
        if resolution % (2 * factor):
            raise SidError(f"teacher.diffusers.resolution={resolution} must be a multiple of {2 * factor} for this "
                           f"pipeline (its VAE's factor {factor} × its 2×2 packing)")
        return (self.channels(model.config), resolution // factor, resolution // factor)


FAMILIES = (PackedFamily("FluxPipeline", "transformer", "FluxTransformer2DModel", FluxBackbone, FluxCodec,
                         (*encoder(1), *encoder(2))),)
