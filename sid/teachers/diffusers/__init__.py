"""``teacher.kind=diffusers``: diffusers models and pipelines as teachers, and generators exported in diffusers'
own form. The wing's face; its rooms:

==================  ==========================================================================================
``rules``           coefficient rules from scheduler configs (VP ε / v / x0 on a discrete schedule, EDM, flow)
``files``           reading folders, hub ids and the components a pipeline's index names (weights only)
``models``          the diffusers model inside a denoiser, its spec, ``DiffusersTeacher``
``unet``            pixel-space UNets (and the teacher ``sid teacher`` trains)
``codecs``          a latent pipeline's frozen VAE and text encoders
``family``          what a latent family module gives: its ``Family`` row
``families/``       one module per latent family (SD, SDXL, SD3, PixArt, Sana, DiT, FLUX), registered there
``published``       the published architectures sid ships, as folders of configs (the memory plan, offline)
``latent``          latent pipeline folders as teachers
``stock``           exports as their family's stock pipeline (SD, SDXL, SD3, FLUX) and the call that reproduces them
``pipeline``        ``SiDPipeline``: a generator as a diffusers pipeline, with diffusers' pipeline contract
``exchange``        the export as a LoRA on its teacher (``sid export-lora``)
``single_file``     an SD 1.x export as one checkpoint file in the original layout (``sid export-single-file``)
``export``          the export in diffusers' form (stock, else ``SiDPipeline``), its model card, reading it back
==================  ==========================================================================================

Loading reads weights only (safetensors, or torch files read weights-only, as diffusers does) and runs code from a
folder only where a text encoder or tokenizer names its own (``auto_map``) and ``trust_code`` allows it.
"""

from __future__ import annotations

import diffusers
from torch import nn

from sid.teachers.base import Teacher
from sid.teachers.diffusers import latent, unet
from sid.teachers.diffusers.exchange import LORA_FILE, export_lora
from sid.teachers.diffusers.export import export_native, load_native, note_native, stock_call
from sid.teachers.diffusers.families import FAMILIES
from sid.teachers.diffusers.files import load_clip, names_a_teacher
from sid.teachers.diffusers.latent import export_codec
from sid.teachers.diffusers.pipeline import SiDPipeline
from sid.teachers.diffusers.single_file import export_single_file
from sid.teachers.diffusers.unet import denoiser_from_config, sample_shape, save_teacher


def build(section, trust_code: bool = False) -> Teacher:
    """The teacher of ``teacher.diffusers``: a latent pipeline folder or hub id (``FAMILIES``) with its VAE and text
    encoders, else a pixel-space UNet (a folder, a hub id, ``builtin:<name>``, or a random one from its config)."""
    found = latent.latent_pipeline(section)
    if found is not None:
        return latent.load(*found, section.resolution, trust_code=trust_code,
                           max_sequence_length=section.max_sequence_length)
    return unet.build(section)


def architecture(section, trust_code: bool = False) -> Teacher | None:
    """A latent pipeline's teacher on the meta device, for the memory plan: its networks built from their configs
    alone (nothing allocated, no weights read; a hub id's configs and tokenizers fetched, not its weights); None for
    a UNet, which is small enough to build as it is."""
    found = latent.latent_pipeline(section, weights=False)
    if found is None:
        return None
    return latent.load(*found, section.resolution, meta=True, trust_code=trust_code,
                       max_sequence_length=section.max_sequence_length).to("meta")


def denoiser_from_spec(spec: dict, trust_code: bool = False) -> nn.Module:
    """An exported generator's architecture (random weights): the network class and config its spec names, under
    its latent family's backbone where it has one."""
    network = backbone_from_spec(spec)
    if spec.get("pipeline") in FAMILIES:
        return latent.latent_denoiser(spec["pipeline"], network, spec["prediction_type"], spec["scheduler_config"],
                                      spec["sigma_data"])
    return unet.denoiser_from_unet(network, spec["prediction_type"], spec["scheduler_config"], spec["sigma_data"])


def spec_shape(spec: dict) -> tuple:
    """The sample shape the spec's network takes: its input channels, at any height and width (a latent export
    records the size it was distilled at)."""
    family = FAMILIES.get(spec.get("pipeline"))
    return (family.channels(spec["unet_config"]) if family else spec["unet_config"].get("in_channels")), None, None


def backbone_from_spec(spec: dict) -> nn.Module:
    """The network alone (no schedule), e.g. on the meta device to size it before anything is allocated: a
    latent pipeline's network of its family's class only, else a UNet."""
    family = FAMILIES.get(spec.get("pipeline"))
    if family is not None and spec["class_name"] == family.model:
        return getattr(diffusers, family.model).from_config(spec["unet_config"])
    return unet.unet_class(spec["class_name"]).from_config(spec["unet_config"])


__all__ = ["LORA_FILE", "SiDPipeline", "architecture", "backbone_from_spec", "build", "denoiser_from_config",
           "denoiser_from_spec", "export_codec", "export_lora", "export_native", "export_single_file", "load_clip",
           "load_native", "names_a_teacher", "note_native", "sample_shape", "save_teacher", "stock_call"]
