"""Latent diffusers pipelines: each pipeline's network under the denoiser contract in latent space, with the
pipeline's own VAE and text encoders, encoding prompts as the pipeline encodes them.

Part of the diffusers adapter (``teacher.kind=diffusers``): a folder whose ``model_index.json`` names one of the
``FAMILIES`` is read here. Each family is its network's class, a backbone that hands the network its condition, and
a codec (the frozen VAE and text encoders) that makes the condition:

==============================  ========================  ====================================================
pipeline                        network                   condition (batch first)
==============================  ========================  ====================================================
StableDiffusionPipeline         UNet2DConditionModel      text: one CLIP's last hidden states
StableDiffusionXLPipeline       UNet2DConditionModel      text: two CLIPs' penultimate states side by side;
                                                          pooled: the second's projection; time_ids: SDXL's
                                                          size and crop micro-conditioning
StableDiffusion3Pipeline        SD3Transformer2DModel     text: two CLIPs' penultimate states (padded) then
                                                          T5's (zeros without T5); pooled: both projections
PixArtAlphaPipeline,            PixArtTransformer2DModel  text: T5's states; mask: its attention mask (120 /
PixArtSigmaPipeline                                       300 tokens); resolution, aspect_ratio (1024-px α)
SanaPipeline                    SanaTransformer2DModel    text, mask: Gemma 2's states of the prompt after the
                                                          pipeline's instruction, its first and last 299 kept
DiTPipeline                     DiTTransformer2DModel     one-hot class labels; the zero vector: null class
==============================  ========================  ====================================================

The null condition of text families is the empty prompt's encoding (SDXL: zeros, where its pipeline's
``force_zeros_for_empty_prompt`` says so), as the pipelines' classifier-free guidance uses it. The VAE turns latents
into images with the pipeline's scaling factor (and shift). Weights only are read (safetensors, or torch files read
weights-only, as diffusers does), each component by the class its index names, from diffusers and transformers only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sid.errors import SidError
from sid.precond import Preconditioned
from sid.teachers.base import Teacher


def _context(cond, key: str, model: nn.Module, family: str) -> torch.Tensor:
    """``cond[key]`` on the model's device, floating values in its dtype; one line when the condition lacks it."""
    if not isinstance(cond, dict) or key not in cond:
        raise SidError(f"a {family} network needs a condition with {key!r}; encode prompts with the teacher's "
                       "encode()")
    value = cond[key].to(model.device)
    return value.to(model.dtype) if value.is_floating_point() else value


def _eps_channels(out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """A learned-variance output (2C channels: ε, then the variance) keeps its ε channels, as the pipelines do."""
    return out[:, :x_in.shape[1]]


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
            added = {"text_embeds": _context(cond, "pooled", unet, "SDXL"),
                     "time_ids": _context(cond, "time_ids", unet, "SDXL")}
        return unet(x_in.to(unet.dtype), c_noise,
                    encoder_hidden_states=_context(cond, "text", unet, "text-conditioned UNet"),
                    added_cond_kwargs=added, return_dict=False)[0]


class JointTransformerBackbone(nn.Module):
    """``F(x_in, c_noise, cond)`` over SD3's MM-DiT (``SD3Transformer2DModel``): cond["text"] is its
    ``encoder_hidden_states``, cond["pooled"] its ``pooled_projections``; c_noise is the flow time × 1000."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> torch.Tensor:
        net = self.transformer
        return net(hidden_states=x_in.to(net.dtype), timestep=c_noise,
                   encoder_hidden_states=_context(cond, "text", net, "SD3"),
                   pooled_projections=_context(cond, "pooled", net, "SD3"), return_dict=False)[0]


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
            added = {k: _context(cond, k, net, "1024-px PixArt-α") for k in added}
        out = net(x_in.to(net.dtype), encoder_hidden_states=_context(cond, "text", net, "PixArt"),
                  encoder_attention_mask=_context(cond, "mask", net, "PixArt"), timestep=c_noise,
                  added_cond_kwargs=added, return_dict=False)[0]
        return _eps_channels(out, x_in)


class SanaBackbone(nn.Module):
    """``F(x_in, c_noise, cond)`` over a ``SanaTransformer2DModel``: cond["text"] and cond["mask"] are Gemma 2's
    states and attention mask; the time input is scaled by the model's ``timestep_scale``, as its pipeline does."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> torch.Tensor:
        net = self.transformer
        out = net(x_in.to(net.dtype), encoder_hidden_states=_context(cond, "text", net, "Sana"),
                  encoder_attention_mask=_context(cond, "mask", net, "Sana"),
                  timestep=c_noise * net.config.timestep_scale, return_dict=False)[0]
        return _eps_channels(out, x_in)


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
        return _eps_channels(out, x_in)


class ImageCodec:
    """The frozen VAE of a latent pipeline: latents -> images, as the pipeline decodes them."""

    text_to_image = False

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.visit = None                      # offloaded: the device the networks visit to work, else None

    @classmethod
    def build(cls, vae, parts: dict, model: nn.Module, index: dict, image_size: tuple[int, int]) -> ImageCodec:
        """The codec of a pipeline folder's ``vae`` and text ``parts`` around its network ``model``, for images of
        ``image_size`` (height, width); text families read more of them."""
        return cls(vae)

    def offload(self, device) -> None:
        """Keep the networks on the CPU; each encode or decode moves them to ``device`` and back."""
        self.to("cpu")
        self.visit = torch.device(device)

    @contextlib.contextmanager
    def working(self):
        """The networks on their working device for the duration (offloaded: there and back)."""
        if self.visit is None:
            yield
            return
        for net in self.networks():
            net.to(self.visit)
        try:
            yield
        finally:
            for net in self.networks():
                net.to("cpu")

    def components(self) -> dict:
        return {"vae": self.vae}

    def networks(self) -> tuple:
        return tuple(v for v in self.components().values() if isinstance(v, nn.Module))

    def to(self, device=None, dtype: torch.dtype | None = None):
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for net in self.networks():
            net.to(**moves)
        return self

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE, as the pipeline decodes them."""
        vae = self.vae
        with self.working():
            z = latents.to(next(vae.parameters()).device, vae.dtype) / self.scaling_factor + self.shift_factor
            return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)


class TextCodec(ImageCodec):
    """The frozen parts of a latent text-to-image pipeline around its denoiser: its tokenizers and text encoders
    (prompts -> conditions) and the VAE (latents -> images). The teacher and an exported ``SiDPipeline`` use the
    same one, so a generator's images are decoded as its teacher's are.

    This class encodes as Stable Diffusion 1.x / 2.x does (one CLIP's last hidden states); each other family
    overrides ``encode_text``. ``micro`` holds per-image constants every condition carries (SDXL's time ids,
    PixArt-α's size), the same for the null condition, as the pipelines pass them.
    """

    text_to_image = True

    def __init__(self, vae, parts: dict, micro: dict | None = None):
        super().__init__(vae)
        self.parts = {k: v.eval().requires_grad_(False) if isinstance(v, nn.Module) else v
                      for k, v in parts.items() if v is not None}
        self.micro = {k: torch.as_tensor(v, dtype=torch.float32).reshape(1, -1) for k, v in (micro or {}).items()}
        self._null = None

    @classmethod
    def build(cls, vae, parts, model, index, image_size) -> TextCodec:
        return cls(vae, parts)

    def components(self) -> dict:
        return {"vae": self.vae, **self.parts}

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextCodec:
        self._null = None
        return super().to(device, dtype)

    def tokens(self, name: str, prompts: list[str], length: int | None = None):
        """The tokenizer ``name``'s encoding of ``prompts``, padded to ``length`` (default: its own), truncated."""
        tokenizer = self.parts[name]
        return tokenizer(prompts, padding="max_length", max_length=length or tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")

    def run(self, name: str, ids: torch.Tensor, **kwargs):
        """The text encoder ``name`` on token ids (on its device)."""
        encoder = self.parts[name]
        return encoder(ids.to(encoder.device), **kwargs)

    def encode_text(self, prompts: list[str]) -> dict:
        """The condition of each prompt, as ``StableDiffusionPipeline.encode_prompt`` makes it."""
        return {"text": self.run("text_encoder", self.tokens("tokenizer", prompts).input_ids)[0]}

    @torch.no_grad()
    def encode(self, prompts: list[str], text=None) -> dict:
        """Prompts -> their conditions (floating values in float32), with the micro-conditioning constants;
        ``text``: the encoding to use (default: ``encode_text``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self.working():
            cond = (text or self.encode_text)(prompts)
        cond = {k: v.float() if v.is_floating_point() else v for k, v in cond.items()}
        device = next(iter(cond.values())).device
        return {**cond, **{k: v.to(device).expand(len(prompts), -1) for k, v in self.micro.items()}}

    def null(self) -> dict:
        """The null condition of one image: the empty prompt's encoding."""
        return self.encode([""])

    def null_condition(self, n: int) -> dict:
        """The null condition ``n`` times: the unconditional half of the pipeline's guidance."""
        if self._null is None:
            self._null = self.null()
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def fingerprint(self) -> str:
        """What identifies the encoding: each tokenizer (class, length, vocabulary size) and text encoder (class,
        config, every weight), and the micro-conditioning, as a SHA-256 (an embeddings cache names the encoders it
        was made with)."""
        from sid.checkpoint import tensors_checksum

        described = []
        for name, part in sorted(self.parts.items()):
            if isinstance(part, nn.Module):
                described.append([name, type(part).__name__, part.config.to_dict(),
                                  tensors_checksum(part.state_dict())])
            else:
                described.append([name, type(part).__name__, part.model_max_length, len(part)])
        described.append({k: v.tolist() for k, v in self.micro.items()})
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _clip(codec: TextCodec, suffix: str, prompts: list[str]):
    """(penultimate hidden states, first output) of the CLIP text encoder ``text_encoder{suffix}``, as SDXL and SD3
    read them (``output_hidden_states``; clip_skip unset); the first output of a ``...WithProjection`` model is
    its pooled projection."""
    out = codec.run(f"text_encoder{suffix}", codec.tokens(f"tokenizer{suffix}", prompts).input_ids,
                    output_hidden_states=True)
    return out.hidden_states[-2], out[0]


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
                hidden, first = _clip(self, suffix, prompts)
                states.append(hidden)
                pooled = first if first.ndim == 2 else pooled          # the last encoder with a projection
        return {"text": torch.cat(states, dim=-1), "pooled": pooled}

    def null(self) -> dict:
        cond = self.encode([""])
        if self.zero_null:
            cond.update({k: torch.zeros_like(cond[k]) for k in ("text", "pooled")})
        return cond


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
        return cls(vae, parts, joint_attention_dim=int(model.config.joint_attention_dim))

    def encode_text(self, prompts: list[str]) -> dict:
        (hidden, pooled), (hidden_2, pooled_2) = _clip(self, "", prompts), _clip(self, "_2", prompts)
        clip = torch.cat([hidden, hidden_2], dim=-1)
        if "text_encoder_3" in self.parts:
            ids = self.tokens("tokenizer_3", prompts, self.max_sequence_length).input_ids
            t5 = self.run("text_encoder_3", ids)[0]
        else:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"text": torch.cat([clip, t5], dim=-2), "pooled": torch.cat([pooled, pooled_2], dim=-1)}


class PixArtCodec(TextCodec):
    """PixArt-α's encoding (``PixArtAlphaPipeline.encode_prompt``, captions as given: its optional caption cleaning
    is not applied): T5's states over ``max_sequence_length`` tokens with their attention mask; a 1024-px PixArt-α
    also gets the image's resolution and aspect ratio."""

    max_sequence_length = 120                      # PixArt-α's pipeline default

    @classmethod
    def build(cls, vae, parts, model, index, image_size):
        height, width = image_size
        micro = {"resolution": [height, width], "aspect_ratio": [height / width]}
        return cls(vae, parts, micro if model.use_additional_conditions else None)

    def encode_text(self, prompts: list[str]) -> dict:
        tokens = self.tokens("tokenizer", prompts, self.max_sequence_length)
        mask = tokens.attention_mask
        text = self.run("text_encoder", tokens.input_ids, attention_mask=mask.to(self.parts["text_encoder"].device))
        return {"text": text[0], "mask": mask.to(text[0].device)}


class PixArtSigmaCodec(PixArtCodec):
    """PixArt-Σ's encoding: as PixArt-α's, over 300 tokens (its pipeline's default)."""

    max_sequence_length = 300


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
        import inspect

        import diffusers

        default = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
        return cls(vae, parts, instruction="\n".join(default or []))

    def gemma(self, prompts: list[str], instruction: str = "") -> dict:
        """Gemma 2's states and mask of ``instruction + prompt``, over the instruction's tokens + 298 (the prompt
        alone: 300), as ``SanaPipeline._get_gemma_prompt_embeds`` computes them."""
        tokenizer = self.parts["tokenizer"]
        extra = len(tokenizer.encode(instruction)) - 2 if instruction else 0
        tokens = self.tokens("tokenizer", [instruction + p for p in prompts], self.max_sequence_length + extra)
        mask = tokens.attention_mask
        text = self.run("text_encoder", tokens.input_ids, attention_mask=mask.to(self.parts["text_encoder"].device))
        return {"text": text[0], "mask": mask.to(text[0].device)}

    def encode_text(self, prompts: list[str]) -> dict:
        cond = self.gemma(prompts, self.instruction)
        keep = [0, *range(-self.max_sequence_length + 1, 0)]           # the first token and the last 299
        return {k: v[:, keep] for k, v in cond.items()}

    def null(self) -> dict:
        return self.encode([""], text=self.gemma)


class Family(NamedTuple):
    """What sid reads of a latent pipeline folder."""

    network: str               # the component holding the network: unet or transformer
    model: str                 # its diffusers class
    backbone: type             # F(x_in, c_noise, cond) over it
    codec: type                # the frozen VAE (and text encoders) around it
    encoders: tuple = ()       # text encoder and tokenizer components
    optional: tuple = ()       # of those, the ones a folder may leave out (null in its index)

    def components(self) -> tuple:
        return (self.network, "scheduler", "vae", *self.encoders)


_CLIP = ("text_encoder", "tokenizer")
_CLIP_2 = ("text_encoder_2", "tokenizer_2")
FAMILIES = {
    "StableDiffusionPipeline": Family("unet", "UNet2DConditionModel", TextUNetBackbone, TextCodec, _CLIP),
    "StableDiffusionXLPipeline": Family("unet", "UNet2DConditionModel", TextUNetBackbone, SDXLCodec,
                                        (*_CLIP, *_CLIP_2), optional=_CLIP),
    "StableDiffusion3Pipeline": Family("transformer", "SD3Transformer2DModel", JointTransformerBackbone, SD3Codec,
                                       (*_CLIP, *_CLIP_2, "text_encoder_3", "tokenizer_3"),
                                       optional=("text_encoder_3", "tokenizer_3")),
    "PixArtAlphaPipeline": Family("transformer", "PixArtTransformer2DModel", PixArtBackbone, PixArtCodec, _CLIP),
    "PixArtSigmaPipeline": Family("transformer", "PixArtTransformer2DModel", PixArtBackbone, PixArtSigmaCodec, _CLIP),
    "SanaPipeline": Family("transformer", "SanaTransformer2DModel", SanaBackbone, SanaCodec, _CLIP),
    "DiTPipeline": Family("transformer", "DiTTransformer2DModel", ClassTransformerBackbone, ImageCodec),
}
# Pipelines this module reads (``diffusers.LATENT_PIPELINES``), each with the components it needs.
COMPONENTS = {name: family.components() for name, family in FAMILIES.items()}


def family_of(name: str | None) -> Family:
    if name not in FAMILIES:
        raise SidError(f"a latent pipeline {name!r} is not read by this version; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


class LatentTeacher(Teacher):
    """A latent teacher: the denoiser works on latents of ``shape``; ``decode`` turns latents into images in
    [-1, 1] through its ``codec``'s VAE (sample grids, FID, export; never the training step), whose networks are
    frozen. Class-conditional latent models (DiT) are this, with the zero one-hot vector as their null class."""

    def __init__(self, denoiser: Preconditioned, shape, spec: dict, codec: ImageCodec, zero_label_is_null=False):
        super().__init__(denoiser, shape, spec, zero_label_is_null=zero_label_is_null)
        self.codec = codec

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

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

    def offload_codec(self, device) -> None:
        """``perf.offload_codec``: the VAE (and text encoders) on the CPU between uses."""
        self.codec.offload(device)

    def checkpoint_activations(self, net: nn.Module) -> None:
        """diffusers' own block-by-block checkpointing where the network has it, else the whole backbone."""
        from sid.teachers.diffusers import checkpoint_blocks

        checkpoint_blocks(net)

    def lora_target(self, net: nn.Module) -> nn.Module:
        """The diffusers model itself: adapter keys as diffusers and peft name them for it."""
        from sid.teachers.diffusers import model_of

        return model_of(net)


class LatentTextTeacher(LatentTeacher):
    """A latent text-to-image teacher: ``encode`` turns prompts into conditions by its codec's text encoders."""

    text_to_image = True

    def encode(self, prompts: list[str]) -> dict:
        return self.codec.encode(prompts)

    def null_condition(self, n: int) -> dict:
        return self.codec.null_condition(n)

    def encoder_fingerprint(self) -> str:
        return self.codec.fingerprint()


def latent_denoiser(pipeline: str, model: nn.Module, prediction_type: str, scheduler_config: dict | None,
                    sigma_data: float = 0.5) -> Preconditioned:
    """A latent pipeline's network under its family's backbone and the coefficient rule of its scheduler (the
    diffusers adapter's rules); a class-conditional one's label_dim its number of classes."""
    from sid.teachers.diffusers import rule_of

    backbone = family_of(pipeline).backbone(model)
    return Preconditioned(backbone, rule_of(prediction_type, scheduler_config, sigma_data),
                          label_dim=getattr(backbone, "classes", 0))


def denoiser_from_spec(spec: dict) -> Preconditioned:
    """An exported latent generator's architecture (random weights) from its spec."""
    from sid.teachers.diffusers import backbone_from_spec

    return latent_denoiser(spec["pipeline"], backbone_from_spec(spec), spec["prediction_type"],
                           spec["scheduler_config"], spec["sigma_data"])


def load(root: Path, index: dict, resolution: int | None = None, meta: bool = False) -> LatentTeacher:
    """The teacher of a latent pipeline folder (``FAMILIES``): its network with its VAE and text encoders, for
    square images of ``resolution`` pixels (default: the network's own sample size); one line for a missing or
    unreadable component. ``meta`` (the memory plan): each network built from its config alone on the meta device
    (sizes, no memory, no weights read), the tokenizers read as they are."""
    import diffusers

    from sid.teachers.diffusers import prediction_of, spec_of

    name = index.get("_class_name")
    family = family_of(name)
    if family.encoders:
        try:
            import transformers  # noqa: F401  (the text encoders' library)
        except ImportError:
            raise SidError(f"{root} is a {name}, whose text encoders need transformers: pip install "
                           "'sid-distill[text]' (or transformers)") from None
    absent = [c for c in family.optional if not held(index, c)]
    missing = [c for c in family.components() if c not in absent and not (root / c).is_dir()]
    if missing:
        needed = ", ".join(c for c in family.components() if c not in family.optional)
        raise SidError(f"teacher folder {root} is a {name} without {', '.join(missing)}/; a {name} folder needs "
                       f"{needed} (save the whole pipeline with save_pretrained)")
    from sid.teachers.diffusers import _read_json

    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json") or {}
    prediction_type = prediction_of(scheduler_config)
    if family.encoders and prediction_type not in ("epsilon", "v_prediction", "flow"):
        raise SidError(f"{root}: a {name} whose scheduler predicts {prediction_type!r}; supported: epsilon, "
                       "v_prediction, flow")
    try:
        model = _read(getattr(diffusers, family.model), root / family.network, meta)
        denoiser = latent_denoiser(name, model, prediction_type, scheduler_config)
        shape = latent_shape(model, _vae_factor(root), resolution)
        codec = load_codec(root, index, model, shape, meta)
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"cannot load the {name} in {root}: {(str(e).splitlines() or [''])[0][:200]}") from None
    spec = {**spec_of(denoiser, prediction_type, scheduler_config), "pipeline": name}
    if family.encoders:
        return LatentTextTeacher(denoiser, shape, spec, codec)
    return LatentTeacher(denoiser, shape, spec, codec, zero_label_is_null=True)


def _vae_factor(root: Path) -> int:
    from sid.teachers.diffusers import _read_json

    return vae_factor(_read_json(root / "vae" / "config.json") or {})


def vae_factor(config) -> int:
    """How many pixels one latent spans: 2^(levels − 1) of the VAE's config (an AutoencoderKL's block channels,
    an AutoencoderDC's encoder's), as the pipelines compute it."""
    levels = config.get("block_out_channels") or config.get("encoder_block_out_channels") or [0] * 4
    return 2 ** (len(levels) - 1)


def latent_shape(model: nn.Module, factor: int, resolution: int | None = None) -> tuple[int, int, int]:
    """One latent's shape: (channels, height, width) at the network's own sample size, or for square images of
    ``resolution`` pixels (a multiple of the VAE's factor × the network's patch size)."""
    config = model.config
    if resolution is None:
        size = config.sample_size
        return (config.in_channels, *((size, size) if isinstance(size, int) else size))
    step = factor * int(getattr(config, "patch_size", None) or 1)
    if resolution % step:
        raise SidError(f"teacher.diffusers.resolution={resolution} must be a multiple of {step} for this pipeline "
                       f"(its VAE's factor {factor} × its patch size)")
    return (config.in_channels, resolution // factor, resolution // factor)


def load_codec(root: Path, index: dict, model: nn.Module | None = None, shape=None, meta: bool = False) -> ImageCodec:
    """The VAE (with the text encoders and tokenizers its family reads) of a pipeline folder (a teacher's, or a
    latent generator's export, whose index names its teacher's pipeline) around its network ``model``, for latents
    of ``shape``; each component by the class its index names, from diffusers and transformers only. Without
    ``model`` and ``shape``: the network's config (built on the meta device) and the export's sample size."""
    name = index.get("_class_name")
    family = family_of(name if name in FAMILIES else index_family(index))
    vae = _component(root, "vae", index, meta)
    if model is None:
        import diffusers

        with torch.device("meta"):
            model = getattr(diffusers, family.model).from_config(
                getattr(diffusers, family.model).load_config(root / family.network))
        size = index.get("sample_size")
        shape = (model.config.in_channels, *size) if size else latent_shape(model, 1)
    parts = {}
    if family.encoders:
        with quiet():
            parts = {name: _component(root, name, index, meta) for name in family.encoders if held(index, name)}
    factor = vae_factor(vae.config)
    return family.codec.build(vae, parts, model, index, (shape[1] * factor, shape[2] * factor))


def held(index: dict, name: str) -> bool:
    """Whether a pipeline's index holds the component ``name`` (not absent, not [null, null])."""
    return (index.get(name) or [None])[0] is not None


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


@contextlib.contextmanager
def quiet():
    """transformers' progress bars off while components load or save: one bar per component is noise in a log."""
    try:
        import transformers  # noqa: F401  (the text encoder's library)
    except ImportError:                                    # pixel-space pipelines need no transformers
        yield
        return
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()


VAES = ("AutoencoderKL", "AutoencoderDC")                 # the VAE classes a latent folder may name


def _component(root: Path, name: str, index: dict, meta: bool = False):
    """A VAE (diffusers), text encoder or tokenizer (transformers) by the class its index names, from those
    libraries only (no other code); ``meta``: a network from its config alone, on the meta device."""
    import diffusers

    library, cls = (index.get(name) or [None, None])[:2]
    if name == "vae":
        if library != "diffusers" or cls not in VAES:
            raise SidError(f"{root}: its vae is {library}.{cls}; supported: {', '.join(VAES)}")
        return _read(getattr(diffusers, cls), root / name, meta)
    import transformers

    model = getattr(transformers, cls or "", None) if library == "transformers" else None
    if model is None:
        raise SidError(f"{root}: its {name} is {library}.{cls}; a transformers text encoder and tokenizer are "
                       "needed")
    if not meta or not (isinstance(model, type) and issubclass(model, transformers.PreTrainedModel)):
        return model.from_pretrained(root / name)                  # a tokenizer: always read
    config = model.config_class.from_pretrained(root / name)
    with torch.device("meta"):
        return model(config)


def _read(cls, folder: Path, meta: bool = False):
    """A diffusers model from its folder: its weights, or (``meta``) its config alone, on the meta device."""
    if not meta:
        return cls.from_pretrained(folder)
    config = cls.load_config(folder)
    with torch.device("meta"):
        return cls.from_config(config)
