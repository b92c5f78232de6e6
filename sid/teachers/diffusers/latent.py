"""Latent pipelines as teachers: a folder (or hub id) whose ``model_index.json`` names one of the families
(``families/``), read as its network under the denoiser contract in latent space, with the pipeline's own VAE and
text encoders, encoding prompts as the pipeline encodes them.

The VAE turns latents into images with the pipeline's scaling factor (and shift). Weights only are read, each
component by the class its index names, from diffusers and transformers only (``files.read_component``).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from torch import nn

from sid.errors import SidError, described, first_line
from sid.guidance import embedded
from sid.precond import Preconditioned
from sid.teachers.diffusers.codecs import ImageCodec, vae_factor
from sid.teachers.diffusers.families import FAMILIES, family_of
from sid.teachers.diffusers.files import (
    export_dir,
    held,
    hub_calls,
    hub_unreachable,
    is_hub_id,
    quiet,
    read_component,
    read_json,
    read_model,
    resolve_path,
)
from sid.teachers.diffusers.models import DiffusersTeacher, model_of, spec_of
from sid.teachers.diffusers.published import published
from sid.teachers.diffusers.rules import prediction_of, rule_of


class LatentTeacher(DiffusersTeacher):
    """A latent teacher: the denoiser works on latents of ``shape``; ``decode`` turns latents into images in
    [-1, 1] through its ``codec``'s VAE (sample grids, FID, export; never the training step), whose networks are
    frozen. Class-conditional latent models (DiT) are this, with the zero one-hot vector as their null class."""

    def __init__(self, denoiser: Preconditioned, shape, spec: dict, codec: ImageCodec, zero_label_is_null=False):
        super().__init__(denoiser, shape, spec, zero_label_is_null=zero_label_is_null)
        self.codec = codec
        # guidance-distilled: its guidance a scalar input (FLUX.1-dev's guidance_embeds), not two forwards
        self.guidance_embedded = bool(getattr(model_of(denoiser).config, "guidance_embeds", False))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    @property
    def image_shape(self) -> tuple[int, ...]:
        factor = vae_factor(self.codec.vae.config)
        return (int(self.codec.vae.config.get("in_channels", 3)), self.shape[-2] * factor, self.shape[-1] * factor)

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(images)

    def to(self, device, denoiser: bool = True) -> LatentTeacher:
        """The denoiser (unless ``denoiser=False``), and the codec unless it is offloaded (then it stays on the CPU
        between uses)."""
        super().to(device, denoiser)
        if self.codec.visit is None:
            self.codec.to(device)
        return self

    def store_frozen(self, dtype: torch.dtype) -> None:
        """The denoiser's backbone and the codec's networks in ``dtype`` (conditions stay float32)."""
        super().store_frozen(dtype)
        self.codec.to(dtype=dtype)

    def components(self) -> dict:
        return self.codec.components()

    def sampling_sigmas(self, steps: int) -> torch.Tensor | None:
        """The noise levels (EDM units, ending with 0) the pipeline's own flow-matching Euler scheduler steps
        through in ``steps`` steps, its shift (and FLUX's resolution-dependent one) applied; from σ = ∞ where its
        times start at t = 1. None for other schedulers (the samplers' Karras schedule)."""
        config = self.spec.get("scheduler_config") or {}
        if config.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            return None
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        t = family_of(self.spec["pipeline"]).flow_times(scheduler, steps, self.shape).double()
        return t / (1 - t)                                     # σ = t / (1 − t): ∞ at t = 1, 0 at t = 0

    def offload_codec(self, device) -> None:
        """``perf.offload_codec``: the VAE (and text encoders) on the CPU between uses."""
        self.codec.offload(device)


class LatentTextTeacher(LatentTeacher):
    """A latent text-to-image teacher: ``encode`` turns prompts into conditions by its codec's text encoders."""

    text_to_image = True

    def encode(self, prompts: list[str]) -> dict:
        return self.codec.encode(prompts)

    def null_condition(self, n: int) -> dict:
        return self.codec.null_condition(n)

    def guide(self, denoiser, scale: float):
        """A guidance-distilled network is told κ through its guidance embedding (``guidance.embedded``); any other
        is guided classifier-free."""
        return embedded(denoiser, scale) if self.guidance_embedded else super().guide(denoiser, scale)

    def encoder_fingerprint(self) -> str:
        return self.codec.fingerprint()


def latent_denoiser(pipeline: str, model: nn.Module, prediction_type: str, scheduler_config: dict | None,
                    sigma_data: float = 0.5) -> Preconditioned:
    """A latent pipeline's network under its family's backbone and the coefficient rule of its scheduler; a
    class-conditional one's label_dim its number of classes."""
    backbone = family_of(pipeline).backbone(model)
    return Preconditioned(backbone, rule_of(prediction_type, scheduler_config, sigma_data),
                          label_dim=getattr(backbone, "classes", 0))


def latent_pipeline(section, weights: bool = True) -> tuple[Path, dict] | None:
    """(folder, index) of the latent pipeline ``teacher.diffusers.path`` names (a folder, or a hub id fetched with
    or without its weights; without, a hub id whose architecture is shipped is read from it: ``published``), or None
    for any other teacher of this adapter."""
    root = Path(resolve_path(section.path)) if section.path else None
    if not weights and root is not None and not root.exists() and (found := published(section.path)):
        return found                                          # the plan: a shipped architecture, offline
    index = read_json(root / "model_index.json") if root is not None and root.is_dir() else None
    if root is not None and not root.exists() and is_hub_id(section.path):
        root, index = hub_pipeline(section.path, weights) or (root, None)
    return (root, index) if index and index.get("_class_name") in FAMILIES else None


def hub_pipeline(path: str, weights: bool = True) -> tuple[Path, dict] | None:
    """A hub id naming a latent pipeline (``FAMILIES``): its folder, with the components the pipeline needs
    (safetensors weights, configs, tokenizer files) from the local cache when the hub cannot be reached, else
    downloaded; and its index. None for a hub model that is not such a pipeline."""
    from huggingface_hub import snapshot_download  # online use only

    repo_id, _, revision = path.partition("@")
    index, offline = None, hub_unreachable()
    for local in (True,) if offline else (True, False):     # the cache first: no request when it is there
        try:
            with hub_calls():
                index = dict(diffusers.DiffusionPipeline.load_config(repo_id, revision=revision or None,
                                                                     local_files_only=local))
            break
        except Exception:                              # not cached, or not a pipeline: the UNet path decides
            continue
    if index is None and offline:
        raise SidError(f"teacher {path!r} is neither a local folder nor a reachable hub model: not in the "
                       f"Hugging Face cache, and the hub cannot be reached ({offline}); go online once to fetch it, or "
                       "give a local folder")
    name = (index or {}).get("_class_name")
    if name not in FAMILIES:
        return None
    files = ("*.json", "*.txt", "*.model")                                  # configs, vocabularies
    if weights:
        files += ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model-*-of-*"
                  ".safetensors", "model-*-of-*.safetensors")
    patterns = ["model_index.json", *(f"{c}/{f}" for c in FAMILIES[name].components() for f in files)]
    for local in (True,) if offline else (False, True):
        try:
            return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                          local_files_only=local)), index
        except Exception as e:                         # hub errors come in many types
            error = e
    raise SidError(f"hub model {repo_id} is a {name} whose components could not be downloaded nor found in the "
                   f"cache ({type(error).__name__}); go online once, or give a local folder")


def load(root: Path, index: dict, resolution: int | None = None, meta: bool = False, trust_code: bool = False,
         max_sequence_length: int | None = None) -> LatentTeacher:
    """The teacher of a latent pipeline folder: its network with its VAE and text encoders, for square images of
    ``resolution`` pixels (default: the network's own sample size); one line for a missing or unreadable
    component. ``meta`` (the memory plan): each network built from its config alone on the meta device (sizes, no
    memory, no weights read), the tokenizers read as they are. ``trust_code``: a text encoder or tokenizer may run
    code of the folder's own (``files.read_component``). ``max_sequence_length``: the tokens of a prompt its T5 or
    Gemma encodes (default: the pipeline's own)."""
    name = index.get("_class_name")
    family = family_of(name)
    if family.text_to_image:
        try:
            import transformers  # noqa: F401  (the text encoders' library, optional)
        except ImportError:
            raise SidError(f"{root} is a {name}, whose text encoders need transformers: pip install "
                           "'sid-distill[text]' (or transformers)") from None
    absent = [c for c in family.optional if not held(index, c)]
    missing = [c for c in family.components() if c not in absent and not (root / c).is_dir()]
    if missing:
        needed = ", ".join(c for c in family.components() if c not in family.optional)
        raise SidError(f"teacher folder {root} is a {name} without {', '.join(missing)}/; a {name} folder needs "
                       f"{needed} (save the whole pipeline with save_pretrained)")
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json") or {}
    prediction_type = prediction_of(scheduler_config)
    if family.text_to_image and prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise SidError(f"{root}: a {name} whose scheduler predicts {prediction_type!r}; supported: epsilon, "
                       "v_prediction, flow")
    try:
        model = read_model(getattr(diffusers, family.model), root / family.network, meta)
        denoiser = latent_denoiser(name, model, prediction_type, scheduler_config)
        shape = family.latent_shape(model, vae_factor(read_json(root / "vae" / "config.json") or {}), resolution)
        codec = load_codec(root, {**index, "max_sequence_length": max_sequence_length}, model, shape, meta, trust_code)
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"cannot load the {name} in {root}: {first_line(e, 200)}") from None
    spec = spec_of(denoiser, prediction_type, scheduler_config, pipeline=name)
    if max_sequence_length:                                    # an export encodes prompts as the teacher did
        spec["max_sequence_length"] = max_sequence_length
    if family.text_to_image:
        return LatentTextTeacher(denoiser, shape, spec, codec)
    return LatentTeacher(denoiser, shape, spec, codec, zero_label_is_null=True)


def load_codec(root: Path, index: dict, model: nn.Module | None = None, shape=None, meta: bool = False,
               trust_code: bool = False) -> ImageCodec:
    """The VAE (with the text encoders and tokenizers its family reads) of a pipeline folder (a teacher's, or a
    latent generator's export, whose index names its teacher's pipeline) around its network ``model``, for latents
    of ``shape``; each component by the class its index names, from diffusers and transformers only. Without
    ``model`` and ``shape``: the network's config (built on the meta device) and the export's sample size."""
    name = index.get("_class_name")
    family = family_of(name if name in FAMILIES else index_family(index))
    vae = read_component(root, "vae", index, meta)
    if model is None:
        model = read_model(getattr(diffusers, family.model), root / family.network, meta=True)
        size = index.get("sample_size")
        shape = (family.channels(model.config), *size) if size else family.latent_shape(model, 1)
    parts = {}
    if family.text_to_image:
        with quiet():
            parts = {part: read_component(root, part, index, meta, trust_code)
                     for part in family.encoders if held(index, part)}
    factor = vae_factor(vae.config)
    codec = family.codec.build(vae, parts, model, index, (shape[1] * factor, shape[2] * factor))
    return with_length(codec, index.get("max_sequence_length"), family.pipeline)


def with_length(codec: ImageCodec, length: int | None, pipeline: str) -> ImageCodec:
    """The codec encoding prompts over ``length`` tokens of its T5 or Gemma (None: the pipeline's own length); one
    line for a family whose encoders have no such length."""
    if length:
        if getattr(codec, "max_sequence_length", None) is None:
            raise SidError(f"teacher.diffusers.max_sequence_length={length}: a {pipeline} has no T5 or Gemma whose "
                           "length can be set (its CLIP tokenizers have their own); leave it null")
        codec.max_sequence_length = int(length)
    return codec


def export_codec(folder, trust_code: bool = False) -> ImageCodec | None:
    """The VAE (and text encoder and tokenizer) an export of a latent generator carries (its teacher's), or None
    for an export of a pixel-space one: ``folder`` is the export, its run folder, or a file in it."""
    folder = export_dir(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    if not held(index, "vae"):
        return None
    if index.get("_class_name") in FAMILIES:            # a stock-form export: sid's record says size and length
        try:
            record = json.loads((folder / "generator.json").read_text())
            index = {**index, "sample_size": record["shape"][1:],
                     "max_sequence_length": record["denoiser"].get("max_sequence_length")}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        return load_codec(folder, index, trust_code=trust_code)
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"{folder}: its vae/, text_encoder/ or tokenizer/ cannot be loaded ({described(e)}); "
                       "export it again") from None


def export_family(named: str | None, transformer: bool, text_encoder: bool) -> str | None:
    """The teacher pipeline of a ``SiDPipeline`` export: as its config names it, or, for exports written before it
    was named, DiT where it holds a transformer and Stable Diffusion where it holds a text encoder; None for a
    pixel-space one."""
    if named:
        return named
    if transformer:
        return "DiTPipeline"
    return "StableDiffusionPipeline" if text_encoder else None


def index_family(index: dict) -> str | None:
    """``export_family`` of an export's ``model_index.json``."""
    return export_family(index.get("teacher_pipeline"), held(index, "transformer"), held(index, "text_encoder"))
