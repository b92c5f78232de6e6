"""Sana (``SanaPipeline``): a ``SanaTransformer2DModel`` reading Gemma 2's states of the prompt after the pipeline's
instruction; the deep-compression ``AutoencoderDC``; DPM-Solver's ``flow_prediction`` read as flow."""

from __future__ import annotations

import inspect

import diffusers
import torch
from torch import nn

from sid.teachers.diffusers.codecs import TextCodec
from sid.teachers.diffusers.family import Family, context, encoder, eps_channels, working_device


class SanaBackbone(nn.Module):
    """``F(x_in, c_noise, cond)`` over a ``SanaTransformer2DModel``: cond["text"] and cond["mask"] are Gemma 2's
    states and attention mask; the time input is scaled by the model's ``timestep_scale``, as its pipeline does."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> torch.Tensor:
        net = self.transformer
        out = net(x_in.to(net.dtype), encoder_hidden_states=context(cond, "text", net, "Sana"),
                  encoder_attention_mask=context(cond, "mask", net, "Sana"),
                  timestep=c_noise * net.config.timestep_scale, return_dict=False)[0]
        return eps_channels(out, x_in)


class SanaCodec(TextCodec):
    """Sana's encoding (``SanaPipeline.encode_prompt``, captions as given): the prompt after the pipeline's own
    complex human instruction (the default of its ``__call__``), padded on the right to the instruction's tokens +
    298, through Gemma 2 with its attention mask, then the first token and the last 299 kept; the null condition is
    the empty prompt alone over 300 tokens, as the pipeline encodes its negative prompt."""

    max_sequence_length = 300                      # the pipeline's default

    def __init__(self, vae, parts: dict, micro: dict | None = None, instruction: str = ""):
        super().__init__(vae, parts, micro)
        self.instruction = instruction
        self.parts["tokenizer"].padding_side = "right"

    @classmethod
    def build(cls, vae, parts, model, index, image_size):
        default = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
        return cls(vae, parts, instruction="\n".join(default or []))

    def gemma(self, prompts: list[str], instruction: str = "") -> dict:
        """Gemma 2's states and mask of ``instruction + prompt``, over the instruction's tokens + 298 (the prompt
        alone: 300), as ``SanaPipeline._get_gemma_prompt_embeds`` computes them."""
        tokenizer = self.parts["tokenizer"]
        extra = len(tokenizer.encode(instruction)) - 2 if instruction else 0
        tokens = self.tokens("tokenizer", [instruction + p for p in prompts], self.max_sequence_length + extra)
        mask = tokens.attention_mask
        text = self.run("text_encoder", tokens.input_ids,
                        attention_mask=mask.to(working_device(self.parts["text_encoder"])))
        return {"text": text[0], "mask": mask.to(text[0].device)}

    def encode_text(self, prompts: list[str]) -> dict:
        cond = self.gemma(prompts, self.instruction)
        keep = [0, *range(-self.max_sequence_length + 1, 0)]           # the first token and the last 299
        return {k: v[:, keep] for k, v in cond.items()}

    def null(self) -> dict:
        return self.encode([""], text=self.gemma)


FAMILIES = (Family("SanaPipeline", "transformer", "SanaTransformer2DModel", SanaBackbone, SanaCodec, encoder(1)),)
