"""The latent families: one module each, one line each in ``MODULES``. A family module gives ``FAMILIES``, its
``Family`` rows (``sid/teachers/diffusers/family.py``): the pipeline class, its network, a backbone, a codec.

==============================  ========================  ====================================================
pipeline (module)               network                   condition (batch first)
==============================  ========================  ====================================================
StableDiffusionPipeline (sd)    UNet2DConditionModel      text: one CLIP's last hidden states
StableDiffusionXLPipeline       UNet2DConditionModel      text: two CLIPs' penultimate states side by side;
(sdxl)                                                    pooled: the second's projection; time_ids: SDXL's
                                                          size and crop micro-conditioning
StableDiffusion3Pipeline (sd3)  SD3Transformer2DModel     text: two CLIPs' penultimate states (padded) then
                                                          T5's (zeros without T5); pooled: both projections
PixArtAlphaPipeline,            PixArtTransformer2DModel  text: T5's states; mask: its attention mask (120 /
PixArtSigmaPipeline (pixart)                              300 tokens); resolution, aspect_ratio (1024-px α)
SanaPipeline (sana)             SanaTransformer2DModel    text, mask: Gemma 2's states of the prompt after the
                                                          pipeline's instruction, its first and last 299 kept
DiTPipeline (dit)               DiTTransformer2DModel     one-hot class labels; the zero vector: null class
FluxPipeline (flux)             FluxTransformer2DModel    text: T5's states; pooled: CLIP's pooled output;
                                                          guidance: FLUX.1-dev's guidance embedding's input;
                                                          latents packed 2×2 into tokens inside the backbone
==============================  ========================  ====================================================

The null condition of text families is the empty prompt's encoding (SDXL: zeros, where its pipeline's
``force_zeros_for_empty_prompt`` says so), as the pipelines' classifier-free guidance uses it.
"""

from __future__ import annotations

from sid.errors import SidError
from sid.teachers.diffusers.families import dit, flux, pixart, sana, sd, sd3, sdxl
from sid.teachers.diffusers.family import Family

MODULES = (sd, sdxl, sd3, pixart, sana, dit, flux)
FAMILIES = {family.pipeline: family for module in MODULES for family in module.FAMILIES}


def family_of(name: str | None) -> Family:
    """The family of a pipeline class, or one line naming the ones this version reads."""
    if name not in FAMILIES:
        raise SidError(f"a latent pipeline {name!r} is not read by this version; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]
