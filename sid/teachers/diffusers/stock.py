"""Exports as their family's stock diffusers pipeline: a one-step generator distilled from a Stable Diffusion, SDXL,
PixArt, SD3, FLUX or Sana pipeline is written as that pipeline's own folder (the student's network in place of the
teacher's, the teacher's VAE and text encoders), with a scheduler under which the pipeline's documented call

    pipe(prompt, num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(s))

is the generator's one step, in diffusers alone (no sid import, ``tests/test_export_stock.py``).

* Discrete VP families (SD 1.x/2.x, SDXL, PixArt-α and -Σ; ε or v): ``EulerDiscreteScheduler`` on the teacher's
  own betas cut after the generator's timestep k (``trained_betas`` of length k + 1, ``num_train_timesteps =
  k + 1``, trailing spacing): one step lands on k, σ_k, latents z σ_k, and Euler's one step to σ = 0 is the
  network's x0, which is D(σ_k z; σ_k). A σ_init between two timesteps cannot be one config's one step: the export
  is cut after the next timestep up and its exact call passes ``sigmas=[σ_init, 0.0]`` (Euler maps σ to its
  fractional timestep as sid's rule does, by linear interpolation in ln σ).
* Flow families at t = 1 (SD3, FLUX, Sana; ``generator.sigma_init: .inf``): the teacher's schedule as a
  ``FlowMatchEulerDiscreteScheduler``; one step starts at σ = 1 whatever its shift (1 is the shift's fixed point)
  and steps to 0: z − v(z; 1), the generator.

PixArt's and Sana's calls also switch off their resolution binning (which would resize a size off its table) and
PixArt's caption cleaning (sid encodes prompts as given, and so must the call).

Everything else stays a ``SiDPipeline``, and its model card says so: pixel-space generators, flow generators below
t = 1, few-step generators (whose re-noising no stock scheduler takes), and DiT, whose pipeline starts from unscaled
noise and so cannot start a step at σ_k z.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import diffusers
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from sid.teachers.diffusers.codecs import vae_factor

DISCRETE = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline")
FLOW = ("StableDiffusion3Pipeline", "FluxPipeline", "SanaPipeline")
EXACT = {"PixArtAlphaPipeline": {"use_resolution_binning": False, "clean_caption": False},   # the call as sid
         "PixArtSigmaPipeline": {"use_resolution_binning": False, "clean_caption": False},   # encodes and sizes
         "SanaPipeline": {"use_resolution_binning": False}}


@dataclass
class StockForm:
    """A generator's stock pipeline: its class, scheduler, and the call arguments that reproduce the generator."""

    pipeline: str
    scheduler: object
    call: dict = field(default_factory=dict)     # beyond the prompt and the generator
    plain: bool = True                            # the call is the plain one-step call (no sigmas)

    def call_text(self) -> str:
        """The exact call, as the model card, the export's README and ``sid sample`` print it."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.call.items())
        return f'pipe("a photo of a cat", {args}, generator=torch.Generator().manual_seed(0))'


def stock_form(spec: dict, config: dict, vae_config: dict) -> StockForm | None:
    """The stock form of an export (``spec``: its denoiser's; ``config``: the export's, with σ_init, the sample
    shape and step count; ``vae_config``: the teacher's VAE's), or None where the generator needs ``SiDPipeline``."""
    sigma_init = float(config["sigma_init"])
    family, prediction = spec.get("pipeline"), spec.get("prediction_type")
    if config.get("steps", 1) != 1 or family not in (*DISCRETE, *FLOW):
        return None
    schedule = dict(spec.get("scheduler_config") or {})
    calls = sizes(spec, config, vae_config)
    if family in FLOW:
        if prediction != "flow" or not math.isinf(sigma_init):
            return None
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(schedule)
        return StockForm(family, scheduler, {"num_inference_steps": 1, "guidance_scale": 1.0, **calls})
    if prediction not in ("epsilon", "v_prediction"):
        return None
    teacher = DDPMScheduler.from_config(schedule)
    ac = teacher.alphas_cumprod.double()
    table = ((1 - ac) / ac).sqrt()                               # σ_k as sid's rule computes them
    same = torch.nonzero(table.float() == torch.tensor(sigma_init, dtype=torch.float32))
    plain = len(same) > 0                                        # σ_init is timestep k's σ (in float32, as sampled)
    k = int(same[0]) if plain else int(torch.searchsorted(table, torch.tensor(sigma_init, dtype=torch.float64)))
    if k >= len(table):
        return None
    betas = teacher.betas
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=k + 1, trained_betas=betas[:k + 1].tolist(), prediction_type=prediction,
        timestep_spacing="trailing", steps_offset=0, final_sigmas_type="zero", interpolation_type="linear",
        use_karras_sigmas=False, timestep_type="discrete", rescale_betas_zero_snr=False)
    steps = {"num_inference_steps": 1} if plain else {"sigmas": [float(sigma_init), 0.0]}
    return StockForm(family, scheduler, {**steps, "guidance_scale": 1.0, **calls}, plain)


def sizes(spec: dict, config: dict, vae_config: dict) -> dict:
    """The call's height and width where the generator's latents are not the pipeline's default size (its
    network's ``sample_size``; FLUX's pipeline: 128 latents, Sana's: 1024 pixels), the prompt's length where the
    run encoded it at another than the pipeline's own (``max_sequence_length``), and the family's switches
    (``EXACT``)."""
    latent, factor, pipeline = tuple(config["shape"][-2:]), vae_factor(vae_config), spec.get("pipeline")
    own = (128 if pipeline == "FluxPipeline" else 1024 // factor if pipeline == "SanaPipeline"    # their defaults
           else spec["unet_config"].get("sample_size"))
    own = tuple(own) if isinstance(own, (list, tuple)) else (own, own)
    call = {}
    if latent != own:
        call.update(height=latent[0] * factor, width=latent[1] * factor)
    if spec.get("max_sequence_length"):
        call["max_sequence_length"] = int(spec["max_sequence_length"])
    return {**call, **EXACT.get(spec.get("pipeline"), {})}


def stock_pipeline(form: StockForm, slot: str, network: nn.Module, components: dict):
    """The stock pipeline object of ``form`` (for its config and components), with every component it does not
    need (a safety checker, an image encoder) left empty."""
    cls = getattr(diffusers, form.pipeline)
    given = {slot: network, "scheduler": form.scheduler, **components}
    params = inspect.signature(cls.__init__).parameters
    empty = {name: None for name, p in params.items()
             if name not in given and name != "self" and p.default is inspect.Parameter.empty}
    flags = {"requires_safety_checker": False} if "requires_safety_checker" in params else {}
    return cls(**given, **empty, **flags)
