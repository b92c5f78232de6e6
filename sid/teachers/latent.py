"""Latent diffusers pipelines: Stable Diffusion 1.x / 2.x (text-conditioned UNet) and DiT (class-conditional
transformer), each network under the denoiser contract in latent space, with the pipeline's own VAE (and text
encoder and tokenizer).

Part of the diffusers adapter (``teacher.kind=diffusers``): a folder whose ``model_index.json`` names one of
its ``LATENT_PIPELINES`` is read here. A text condition is ``{"text": encoder_hidden_states}`` (batch first), the
null condition the empty prompt's encoding, as the pipeline's classifier-free guidance uses it; a DiT's condition
is one-hot class labels, the zero vector its null class. The VAE turns latents into images with the pipeline's
scaling factor (and shift, where its config has one). Weights only are read (safetensors, or torch files read
weights-only, as diffusers does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from sid.errors import SidError
from sid.precond import Preconditioned
from sid.teachers.base import Teacher

# Pipelines this module reads (``diffusers.LATENT_PIPELINES``), each with the components it needs.
COMPONENTS = {"StableDiffusionPipeline": ("unet", "scheduler", "vae", "text_encoder", "tokenizer"),
              "DiTPipeline": ("transformer", "scheduler", "vae")}


class TextUNetBackbone(nn.Module):
    """``F(x_in, c_noise, cond)`` over a text-conditioned ``UNet2DConditionModel``: cond["text"] is the encoder's
    last hidden states, the UNet's ``encoder_hidden_states``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict) -> torch.Tensor:
        if not isinstance(cond, dict) or "text" not in cond:
            raise SidError("a text-conditioned UNet needs a condition {'text': encoder hidden states}; encode "
                           "prompts with the teacher's encode()")
        context = cond["text"].to(x_in.device, self.unet.dtype)
        return self.unet(x_in, c_noise, encoder_hidden_states=context, return_dict=False)[0]


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
        return out[:, :x_in.shape[1]]


class ImageCodec:
    """The frozen VAE of a latent pipeline: latents -> images, as the pipeline decodes them."""

    text_to_image = False

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.visit = None                      # offloaded: the device the networks visit to work, else None

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
        return (self.vae,)

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
    """The frozen parts of a latent text-to-image pipeline around its denoiser: the tokenizer and text encoder
    (prompts -> conditions) and the VAE (latents -> images). The teacher and an exported ``SiDPipeline`` use the
    same one, so a generator's images are decoded as its teacher's are."""

    text_to_image = True

    def __init__(self, vae, text_encoder, tokenizer):
        super().__init__(vae)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._null = None

    def components(self) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}

    def networks(self) -> tuple:
        return (self.vae, self.text_encoder)

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextCodec:
        self._null = None
        return super().to(device, dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict:
        """The condition of each prompt: the text encoder's last hidden states over the tokens padded to the
        tokenizer's length, as the pipeline encodes them (``StableDiffusionPipeline.encode_prompt``)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        with self.working():
            device = next(self.text_encoder.parameters()).device
            hidden = self.text_encoder(tokens.input_ids.to(device))[0]
        return {"text": hidden.float()}

    def null_condition(self, n: int) -> dict:
        """The empty prompt's encoding, ``n`` times: the unconditional half of the pipeline's guidance."""
        if self._null is None:
            self._null = self.encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def fingerprint(self) -> str:
        """What identifies the encoding: the tokenizer (class, length, vocabulary size) and the text encoder (class,
        config, every weight), as a SHA-256 (an embeddings cache names the encoder it was made with)."""
        from sid.checkpoint import tensors_checksum

        tok, enc = self.tokenizer, self.text_encoder
        described = json.dumps([type(tok).__name__, tok.model_max_length, len(tok), type(enc).__name__,
                                enc.config.to_dict(), tensors_checksum(enc.state_dict())], sort_keys=True, default=str)
        return hashlib.sha256(described.encode()).hexdigest()


class LatentTeacher(Teacher):
    """A latent teacher: the denoiser works on latents of ``shape``; ``decode`` turns latents into images in
    [-1, 1] through its ``codec``'s VAE (sample grids, FID, export; never the training step), whose networks are
    frozen. Class-conditional latent models (DiT) are this, with the zero one-hot vector as their null class."""

    def __init__(self, denoiser: Preconditioned, shape, spec: dict, codec: ImageCodec, zero_label_is_null=False):
        super().__init__(denoiser, shape, spec, zero_label_is_null=zero_label_is_null)
        self.codec = codec

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def to(self, device) -> LatentTeacher:
        """The denoiser, and the codec unless it is offloaded (then it stays on the CPU between uses)."""
        self.denoiser.to(device)
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
        """``perf.offload_codec``: the VAE (and text encoder) on the CPU between uses."""
        self.codec.offload(device)


class LatentTextTeacher(LatentTeacher):
    """A latent text-to-image teacher: ``encode`` turns prompts into conditions by its codec's text encoder."""

    text_to_image = True

    def encode(self, prompts: list[str]) -> dict:
        return self.codec.encode(prompts)

    def null_condition(self, n: int) -> dict:
        return self.codec.null_condition(n)

    def encoder_fingerprint(self) -> str:
        return self.codec.fingerprint()


def text_denoiser(unet: nn.Module, prediction_type: str, scheduler_config: dict | None,
                  sigma_data: float = 0.5) -> Preconditioned:
    """A text-conditioned UNet with the coefficient rule of its scheduler (the diffusers adapter's rules)."""
    from sid.teachers.diffusers import rule_of

    return Preconditioned(TextUNetBackbone(unet), rule_of(prediction_type, scheduler_config, sigma_data))


def class_denoiser(transformer: nn.Module, prediction_type: str, scheduler_config: dict | None,
                   sigma_data: float = 0.5) -> Preconditioned:
    """A class-conditional DiT with the coefficient rule of its scheduler; label_dim its number of classes."""
    from sid.teachers.diffusers import rule_of

    backbone = ClassTransformerBackbone(transformer)
    return Preconditioned(backbone, rule_of(prediction_type, scheduler_config, sigma_data), label_dim=backbone.classes)


def denoiser_from_spec(spec: dict) -> Preconditioned:
    """An exported latent generator's architecture (random weights) from its spec."""
    from sid.teachers.diffusers import backbone_from_spec

    build = class_denoiser if spec.get("pipeline") == "DiTPipeline" else text_denoiser
    return build(backbone_from_spec(spec), spec["prediction_type"], spec["scheduler_config"], spec["sigma_data"])


def load(root: Path, index: dict) -> LatentTeacher:
    """The teacher of a latent pipeline folder (``LATENT_PIPELINES``): a Stable Diffusion pipeline's UNet with its
    VAE, text encoder and tokenizer, or a DiT's transformer with its VAE; one line for a missing or unreadable
    component."""
    import diffusers

    from sid.teachers.diffusers import _read_json, sample_shape, spec_of

    name = index.get("_class_name")
    text = name != "DiTPipeline"
    if text:
        try:
            import transformers  # noqa: F401  (the text encoder's library)
        except ImportError:
            raise SidError(f"{root} is a {name}, whose text encoder needs transformers: pip install "
                           "'sid-distill[text]' (or transformers)") from None
    missing = [c for c in COMPONENTS[name] if not (root / c).is_dir()]
    if missing:
        raise SidError(f"teacher folder {root} is a {name} without {', '.join(missing)}/; a {name} folder needs "
                       f"{', '.join(COMPONENTS[name])} (save the whole pipeline with save_pretrained)")
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json") or {}
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if text and prediction_type not in ("epsilon", "v_prediction"):
        raise SidError(f"{root}: a {name} whose scheduler predicts {prediction_type!r}; supported: epsilon, "
                       "v_prediction")
    try:
        if text:
            unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
            denoiser = text_denoiser(unet, prediction_type, scheduler_config)
        else:
            transformer = diffusers.DiTTransformer2DModel.from_pretrained(root / "transformer")
            denoiser = class_denoiser(transformer, prediction_type, scheduler_config)
        codec = load_codec(root, index)
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"cannot load the {name} in {root}: {(str(e).splitlines() or [''])[0][:200]}") from None
    spec = {**spec_of(denoiser, prediction_type, scheduler_config), "pipeline": name}
    if text:
        return LatentTextTeacher(denoiser, sample_shape(denoiser), spec, codec)
    return LatentTeacher(denoiser, sample_shape(denoiser), spec, codec, zero_label_is_null=True)


def load_codec(root: Path, index: dict) -> ImageCodec:
    """The VAE (with the text encoder and tokenizer, where the index names them) of a pipeline folder (a
    teacher's, or a latent generator's export), each by the class its index names, from diffusers and
    transformers only."""
    import diffusers

    if (index.get("text_encoder") or [None])[0] is None:
        return ImageCodec(diffusers.AutoencoderKL.from_pretrained(root / "vae"))
    import transformers

    with quiet():
        return TextCodec(diffusers.AutoencoderKL.from_pretrained(root / "vae"),
                         _component(transformers, root, "text_encoder", index),
                         _component(transformers, root, "tokenizer", index))


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


def _component(transformers, root: Path, name: str, index: dict):
    """A text encoder or tokenizer by the class its index names, from transformers only (no other code)."""
    library, cls = (index.get(name) or [None, None])[:2]
    model = getattr(transformers, cls or "", None) if library == "transformers" else None
    if model is None:
        raise SidError(f"{root}: its {name} is {library}.{cls}; a transformers text encoder and tokenizer are "
                       "needed")
    return model.from_pretrained(root / name)
