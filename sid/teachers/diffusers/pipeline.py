"""``SiDPipeline``: a distilled generator as a diffusers pipeline, for what no stock pipeline class can express
(pixel generators of non-EDM teachers, few-step re-noising rules, families without a stock one-step form).

It keeps diffusers' pipeline contract, as a stock text-to-image pipeline does: ``prompt`` or ``prompt_embeds`` (and
``encode_prompt``), ``num_images_per_prompt``, ``height`` / ``width``, ``guidance_scale`` with ``negative_prompt``,
``generator`` (one or one per image), ``latents``, ``callback_on_step_end``, output types as diffusers defines them
("pt" and "np" in [0, 1]), model and sequential CPU offload, ``components`` and ``from_pipe``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Union

import diffusers
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderTiny,
    DiffusionPipeline,
    EDMEulerScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from sid.errors import SidError
from sid.guidance import guided, size
from sid.precond import Preconditioned
from sid.steps import generate
from sid.teachers.diffusers.codecs import ImageCodec, vae_factor
from sid.teachers.diffusers.families import FAMILIES, family_of
from sid.teachers.diffusers.latent import export_family, latent_denoiser, with_length
from sid.teachers.diffusers.models import own_shape
from sid.teachers.diffusers.rules import prediction_of
from sid.teachers.diffusers.stock import DISCRETE, FLOW
from sid.teachers.diffusers.unet import denoiser_from_unet

TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
SLOTS = ("scheduler", "unet", "transformer", "vae", *TEXT_PARTS)
TRANSFORMERS = Union[tuple(getattr(diffusers, name) for name in  # noqa: UP007 (a tuple of classes)
                           sorted({f.model for f in FAMILIES.values() if f.network == "transformer"}))]
EMBEDS = {"text": "prompt_embeds", "pooled": "pooled_prompt_embeds", "mask": "prompt_attention_mask"}
SIGMA_INIT = 2.5                                      # SiD's σ_init, where nothing in the pipeline says another


class SiDPipeline(DiffusionPipeline):
    """A one-step (or few-step) generator as a diffusers pipeline: ``SiDPipeline.from_pretrained(folder)(
    batch_size=4).images``, or, distilled from a text-to-image teacher, ``...("a photo of a cat").images``.

    ``unet`` (or ``transformer``) is the generator's network, ``scheduler`` the teacher's (its parameterisation);
    the config names σ_init, the prediction type, σ_data and, for a latent generator, its teacher's pipeline class
    and latent size. One network evaluation: x = D(σ_init z; σ_init, c), with D the teacher's coefficient rule
    around the network, as sid trained it. A latent generator also holds its teacher's VAE (and text encoders and
    tokenizers): c is the prompt's encoding, as the teacher's pipeline encodes it, and x the latents the VAE decodes.

    Settings left out are read from the components: the prediction type from the scheduler, σ_init from a one-step
    ``EDMEulerScheduler`` (else SiD's 2.5), the family from the components held; so ``SiDPipeline(
    **pipe.components)`` of an EDM export is that export. The optional components of a pipeline are the ones it
    does not hold (``components`` lists the ones it does).
    """

    _optional_components = list(SLOTS)
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, scheduler=None, unet: UNet2DModel | UNet2DConditionModel | None = None,
                 vae: AutoencoderKL | AutoencoderDC | AutoencoderTiny | None = None, text_encoder=None, tokenizer=None,
                 transformer: TRANSFORMERS | None = None, text_encoder_2=None, tokenizer_2=None,
                 text_encoder_3=None, tokenizer_3=None, sigma_init: float | None = None,
                 prediction_type: str | None = None, sigma_data: float = 0.5, teacher_pipeline: str | None = None,
                 sample_size: list[int] | None = None, max_sequence_length: int | None = None, steps: int = 1,
                 renoise: str = "fresh"):
        super().__init__()
        teacher_pipeline = export_family(teacher_pipeline, transformer is not None, text_encoder is not None)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, transformer=transformer,
                              text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        if scheduler is not None:
            schedule = {**scheduler.config, "_class_name": type(scheduler).__name__}
            prediction_type = prediction_type or prediction_of(schedule)
            if sigma_init is None:
                one_step = isinstance(scheduler, EDMEulerScheduler) and schedule["sigma_min"] == schedule["sigma_max"]
                sigma_init = float(schedule["sigma_max"]) if one_step else SIGMA_INIT
        self.register_to_config(sigma_init=sigma_init, prediction_type=prediction_type, sigma_data=sigma_data,
                                teacher_pipeline=teacher_pipeline, sample_size=sample_size,
                                max_sequence_length=max_sequence_length, steps=steps, renoise=renoise)
        self._optional_components = [name for name in SLOTS if getattr(self, name) is None]
        factor = vae_factor(vae.config) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=factor)
        self._guidance_scale = 1.0
        self._num_timesteps = steps

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``; an export in its family's stock form (``stock.py``) is read as
        diffusers reads it, and its generator's settings from sid's ``generator.json`` beside it."""
        folder = Path(pretrained_model_name_or_path)
        index = folder / "model_index.json"
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        if name not in (*DISCRETE, *FLOW):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        stock = DiffusionPipeline.from_pretrained(folder, **kwargs)
        parts = {k: v for k, v in stock.components.items()
                 if v is not None and k in inspect.signature(cls.__init__).parameters}
        return cls(**parts, teacher_pipeline=name, **stock_settings(folder, stock.scheduler))

    @property
    def components(self) -> dict:
        """The components this pipeline holds (diffusers' ``components``, without the slots it leaves empty)."""
        return {k: v for k, v in super().components.items() if v is not None}

    @property
    def family(self) -> str | None:
        """The teacher's latent pipeline class (None: a pixel-space generator)."""
        return self.config.teacher_pipeline

    @property
    def text_to_image(self) -> bool:
        return self.family in FAMILIES and FAMILIES[self.family].text_to_image

    @property
    def network(self) -> nn.Module:
        return self.unet if self.transformer is None else self.transformer

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def denoiser(self) -> Preconditioned:
        """The generator's network under its coefficient rule (and its teacher family's backbone)."""
        config = {**self.scheduler.config, "_class_name": type(self.scheduler).__name__}
        if self.family is not None:
            return latent_denoiser(self.family, self.network, self.config.prediction_type, config,
                                   self.config.sigma_data)
        return denoiser_from_unet(self.unet, self.config.prediction_type, config, self.config.sigma_data)

    def vae_factor(self) -> int:
        """How many pixels one sample's element spans: the VAE's factor, 1 for a pixel generator."""
        return 1 if self.vae is None else vae_factor(self.vae.config)

    def sample_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """One sample's shape: the network's channels at ``height`` × ``width`` pixels (default: the export's
        size, else the network's own)."""
        network, factor = self.network, self.vae_factor()
        size = self.config.sample_size
        if height or width:
            step = factor * int(getattr(network.config, "patch_size", None) or 1)
            own = self.sample_shape()[1:]
            height, width = height or own[0] * factor, width or own[1] * factor
            if height % step or width % step:
                raise ValueError(f"height and width must be multiples of {step} for this generator (its VAE's "
                                 f"factor × its network's patch size); got {height} × {width}")
            size = [height // factor, width // factor]
        if size:
            channels = network.config.in_channels if self.family is None else family_of(self.family).channels(
                network.config)
            return (channels, *size)
        return own_shape(network) if self.family is None else family_of(self.family).latent_shape(network, 1)

    def codec(self, image_size: tuple[int, int] | None = None) -> ImageCodec | None:
        """The VAE (and the text encoders and tokenizers), as the teacher used them, for images of ``image_size``
        pixels (default: the export's size); None for a pixel generator."""
        if self.family is None:
            return None
        parts = {name: getattr(self, name) for name in TEXT_PARTS if getattr(self, name) is not None}
        if image_size is None and self.network is not None:
            shape, factor = self.sample_shape(), self.vae_factor()
            image_size = (shape[1] * factor, shape[2] * factor)
        codec = family_of(self.family).codec.build(self.vae, parts, self.network, dict(self.config),
                                                   image_size or (0, 0))
        return with_length(codec, self.config.max_sequence_length, self.family)

    @torch.no_grad()
    def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, prompt_attention_mask=None,
                      negative_prompt_attention_mask=None):
        """The prompts' embeddings as the teacher's pipeline encodes them, and the negative ones guidance uses
        (``negative_prompt``'s, else the family's null condition: the empty prompt's, SDXL's zeros), each repeated
        ``num_images_per_prompt`` times; embeddings given are used as they are. Families without pooled
        embeddings or attention masks give None for them."""
        codec = self.codec()
        given = {"text": prompt_embeds, "pooled": pooled_prompt_embeds, "mask": prompt_attention_mask}
        cond = embeds(codec, prompt, given)
        n = size(cond)
        negative = {"text": negative_prompt_embeds, "pooled": negative_pooled_prompt_embeds,
                    "mask": negative_prompt_attention_mask}
        if negative_prompt is not None:
            negative_prompt = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
        uncond = embeds(codec, negative_prompt, negative, null=n)
        device = device or self._execution_device
        cond, uncond = ({k: v.to(device).repeat_interleave(num_images_per_prompt, dim=0) if v is not None else None
                         for k, v in c.items()} for c in (cond, uncond))
        prompt_embeds, negative_prompt_embeds = cond["text"], uncond["text"]
        pooled_prompt_embeds, negative_pooled_prompt_embeds = cond["pooled"], uncond["pooled"]
        prompt_attention_mask, negative_prompt_attention_mask = cond["mask"], uncond["mask"]
        return (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                prompt_attention_mask, negative_prompt_attention_mask)

    def conditions(self, codec, label_dim: int, prompt, class_labels, batch_size: int, num_images_per_prompt: int,
                   embedded: dict):
        """(condition, its null) of each image: the prompts' encodings (a text-to-image generator), one-hot
        class labels and the zero vector (a class-conditional one), or (None, None)."""
        if self.text_to_image:
            if prompt is None and embedded["prompt_embeds"] is None:
                raise ValueError("this generator was distilled from a text-to-image teacher: give a prompt or "
                                 "prompt_embeds")
            if isinstance(prompt, str):
                prompt = [prompt] * batch_size
            encoded = self.encode_prompt(prompt, None, num_images_per_prompt, **embedded)
            micro = {k: v.to(encoded[0].device) for k, v in codec.micro.items()}
            pair = [{key: value for key, value in zip(EMBEDS, encoded[half::2]) if value is not None}
                    for half in (0, 1)]
            return tuple({**c, **{k: v.expand(len(c["text"]), -1) for k, v in micro.items()}} for c in pair)
        if prompt is not None or embedded["prompt_embeds"] is not None:
            raise ValueError("this generator takes no prompt (its teacher was not text-to-image)")
        if class_labels is None:
            if label_dim:
                raise ValueError("this generator is class-conditional: give class_labels")
            return None, None
        classes = torch.as_tensor(class_labels, device=self._execution_device).reshape(-1)
        classes = classes.expand(batch_size) if len(classes) == 1 else classes
        cond = nn.functional.one_hot(classes.repeat_interleave(num_images_per_prompt), label_dim).float()
        return cond, torch.zeros_like(cond)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float = 1.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None,
                 prompt_attention_mask: torch.Tensor | None = None,
                 negative_prompt_attention_mask: torch.Tensor | None = None, class_labels=None, batch_size: int = 1,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",),
                 cross_attention_kwargs: dict | None = None):
        """``prompt``: one per image (a text-to-image generator; a single one is used ``batch_size`` times), or
        its ``prompt_embeds`` (``encode_prompt``); ``class_labels``: a class-conditional generator's;
        ``num_images_per_prompt`` images of each; ``guidance_scale``: classifier-free guidance on the generator
        against ``negative_prompt`` (else the null condition) — 1, the default, is the generator as distilled (its
        guidance is in it); an unconditional generator has nothing to guide; ``latents``: the noise z ~ N(0, I)
        itself, instead of drawing it from ``generator``; ``num_inference_steps``: other than the generator's own
        step count (``sid.steps``); ``callback_on_step_end(pipe, i, σ_i, {"latents": x_i})`` after each step, its
        returned latents used from there on; ``output_type``: "pil", "np" or "pt" (images in [0, 1]) or "latent"
        (the generator's own output: latents, or a pixel generator's images in [-1, 1]); ``cross_attention_kwargs``:
        passed to the network's attention (under its own name: ``joint_attention_kwargs`` for SD3 and FLUX), e.g.
        ``{"scale": 0.5}`` for a LoRA loaded on it."""
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not among "
                             f"{self._callback_tensor_inputs}")
        self._guidance_scale = guidance_scale
        self._num_timesteps = steps = num_inference_steps or self.config.steps
        device, denoiser = self._execution_device, self.denoiser()
        shape = self.sample_shape(height, width)
        codec = self.codec((shape[1] * self.vae_factor(), shape[2] * self.vae_factor()))
        embedded = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                    "pooled_prompt_embeds": pooled_prompt_embeds,
                    "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
                    "prompt_attention_mask": prompt_attention_mask,
                    "negative_prompt_attention_mask": negative_prompt_attention_mask,
                    "negative_prompt": negative_prompt}
        cond, null = self.conditions(codec, denoiser.label_dim, prompt, class_labels, batch_size,
                                     num_images_per_prompt, embedded)
        n = size(cond) or batch_size * num_images_per_prompt
        z = (randn_tensor((n, *shape), generator=generator, device=device, dtype=torch.float32) if latents is None
             else latents.to(device, torch.float32))
        noise = ([randn_tensor(z.shape, generator=generator, device=device) for _ in range(steps - 1)]
                 if self.config.renoise == "fresh" else None)                  # the later steps' fresh noise

        def denoise(x, sigma, c):                     # the scale read at each step: a callback may change it
            if cond is None or self._guidance_scale == 1:
                return denoiser(x, sigma, c)
            return guided(denoiser, self._guidance_scale, lambda _: null)(x, sigma, c)

        denoise.rule = denoiser.rule
        with self.progress_bar(total=steps) as bar, attention_kwargs(self.network, cross_attention_kwargs):
            def on_step(i, sigma, d):
                if callback_on_step_end is not None:
                    d = callback_on_step_end(self, i, sigma, {"latents": d}).get("latents", d)
                bar.update()
                return d

            x = generate(denoise, z, float(self.config.sigma_init), steps, self.config.renoise, cond, noise=noise,
                         on_step=on_step)
        if output_type == "latent":
            out = x
        else:
            images = x if codec is None else codec.decode(x)
            out = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)


@contextlib.contextmanager
def attention_kwargs(network: nn.Module, kwargs: dict | None):
    """The network called with ``kwargs`` for its attention for the duration (a forward pre-hook: the denoiser
    contract stays one call), under the name its ``forward`` gives them."""
    if not kwargs:
        yield
        return
    names = [n for n in inspect.signature(network.forward).parameters if n.endswith("attention_kwargs")]
    if not names:
        raise ValueError(f"a {type(network).__name__} takes no attention kwargs: leave cross_attention_kwargs out")
    hook = network.register_forward_pre_hook(lambda m, args, given: (args, {**given, names[0]: dict(kwargs)}),
                                             with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


def embeds(codec, prompts, given: dict, null: int | None = None) -> dict:
    """{text, pooled, mask} of ``prompts`` through the codec, or the embeddings ``given``; with no prompts and
    ``null`` = n, the family's null condition n times."""
    if given["text"] is not None:
        return dict(given)
    if prompts is None and null is None:
        raise ValueError("give a prompt or prompt_embeds")
    if codec is None or not codec.text_to_image or not codec.parts:
        raise ValueError("this generator's text encoders are not loaded: give prompt_embeds")
    cond = codec.null_condition(null) if prompts is None else codec.encode(prompts)
    return {key: cond.get(key) for key in EMBEDS}


def stock_settings(folder: Path, scheduler) -> dict:
    """What a stock-form export says of its generator (``SiDPipeline``'s settings): one step from
    ``generator.json``'s σ_init at its size and prompt length (a stock folder without sid's record beside it is a
    pipeline, not an export), on the scheduler's parameterisation."""
    try:
        record = json.loads((Path(folder) / "generator.json").read_text())
        sigma_init, sample_size, spec = float(record["sigma_init"]), list(record["shape"][1:]), record["denoiser"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SidError(f"{folder} is a stock diffusers pipeline without sid's generator.json beside it: a teacher, "
                       "not an export? Sample a teacher with `sid sample --teacher`") from None
    prediction = prediction_of({**scheduler.config, "_class_name": type(scheduler).__name__})
    return {"sigma_init": sigma_init, "prediction_type": prediction, "sample_size": sample_size,
            "sigma_data": spec.get("sigma_data", 0.5), "max_sequence_length": spec.get("max_sequence_length")}
