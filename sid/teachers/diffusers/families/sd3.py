"""Stable Diffusion 3 (``StableDiffusion3Pipeline``): the MM-DiT ``SD3Transformer2DModel`` on flow matching, two
CLIPs and T5 (or none)."""

from __future__ import annotations

import torch
from torch import nn

from sid.errors import SidError
from sid.teachers.diffusers.codecs import TextCodec
from sid.teachers.diffusers.family import Family, context, encoder


class JointTransformerBackbone(nn.Module):
    """``F(x_in, c_noise, cond)`` over SD3's MM-DiT (``SD3Transformer2DModel``): cond["text"] is its
    ``encoder_hidden_states``, cond["pooled"] its ``pooled_projections``; c_noise is the flow time × 1000."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> torch.Tensor:
        net = self.transformer
        return net(hidden_states=x_in.to(net.dtype), timestep=c_noise,
                   encoder_hidden_states=context(cond, "text", net, "SD3"),
                   pooled_projections=context(cond, "pooled", net, "SD3"), return_dict=False)[0]


class SD3Codec(TextCodec):
    """Stable Diffusion 3's encoding (``StableDiffusion3Pipeline.encode_prompt``): both CLIPs' penultimate states
    side by side, zero-padded to T5's width, then T5's states over ``max_sequence_length`` tokens (zeros of the
    transformer's ``joint_attention_dim`` where the folder has no T5); both CLIPs' pooled projections side by
    side."""

    max_sequence_length = 256                      # the pipeline's default

    def __init__(self, vae, parts: dict, micro: dict | None = None, joint_attention_dim: int = 4096):
        super().__init__(vae, parts, micro)
        self.joint_attention_dim = joint_attention_dim

    @classmethod
    def build(cls, vae, parts, model, index, image_size):
        return cls(vae, parts, joint_attention_dim=None if model is None else int(model.config.joint_attention_dim))

    def encode_text(self, prompts: list[str]) -> dict:
        (hidden, pooled), (hidden_2, pooled_2) = self.clip("", prompts), self.clip("_2", prompts)
        clip = torch.cat([hidden, hidden_2], dim=-1)
        if "text_encoder_3" in self.parts:
            ids = self.tokens("tokenizer_3", prompts, self.max_sequence_length).input_ids
            t5 = self.run("text_encoder_3", ids)[0]
        else:
            if self.joint_attention_dim is None:
                raise SidError("without T5, SD3's prompt encoding is zeros of the transformer's joint_attention_dim: "
                               "load the transformer with the text encoders")
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"text": torch.cat([clip, t5], dim=-2), "pooled": torch.cat([pooled, pooled_2], dim=-1)}


FAMILIES = (Family("StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel", JointTransformerBackbone,
                   SD3Codec, (*encoder(1), *encoder(2), *encoder(3)), optional=encoder(3)),)
