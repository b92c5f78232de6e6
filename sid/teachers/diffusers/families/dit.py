"""DiT (``DiTPipeline``): a class-conditional ``DiTTransformer2DModel`` on latents; learned variance dropped."""

from __future__ import annotations

import torch
from torch import nn

from sid.errors import SidError
from sid.teachers.diffusers.family import Family, eps_channels


class ClassTransformerBackbone(nn.Module):
    """``F(x_in, c_noise, labels)`` over a class-conditional ``DiTTransformer2DModel``: one-hot labels as class
    indices, the zero vector as the null class (index ``num_embeds_ada_norm``, the one its label dropout trained and
    ``DiTPipeline``'s guidance uses); a learned-variance output keeps its ε channels only, as the pipeline does."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.classes = int(transformer.config.num_embeds_ada_norm)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise SidError("a class-conditional DiT needs one-hot class labels (conditions.class_probs draws them)")
        index = torch.where(labels.sum(1) > 0, labels.argmax(1), self.classes)
        out = self.transformer(x_in.to(self.transformer.dtype), timestep=c_noise, class_labels=index,
                               return_dict=False)[0]
        return eps_channels(out, x_in)


FAMILIES = (Family("DiTPipeline", "transformer", "DiTTransformer2DModel", ClassTransformerBackbone),)
