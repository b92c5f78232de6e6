"""``teacher.kind=diffusers``: diffusers UNets as EDM denoisers: VP ε / v / x0 prediction on a discrete
schedule, EDM-preconditioned, or flow matching (velocity prediction).

The only module that knows about timestep indices, prediction types and diffusers configs. A folder's loading
reads weights only (safetensors, or torch files read weights-only, as diffusers does): it runs no code from the
folder, so ``trust_code`` is not needed here.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from sid.config import CHOICES, plain
from sid.errors import SidError
from sid.precond import Coefficients, EDMRule, FlowRule, Preconditioned
from sid.teachers.base import Teacher
from sid.teachers.latent import FAMILIES as LATENT_FAMILIES

PREDICTION_TYPES = tuple(c for c in CHOICES["teacher.diffusers.prediction_type"] if c)     # the schema's list
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
ASSETS = Path(__file__).resolve().parent.parent / "assets"       # teachers shipped inside the package
BUILTIN = "builtin:"                                               # teacher.diffusers.path=builtin:<name>


def builtin_teachers() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "unet" / "config.json").is_file()) if ASSETS.is_dir() else []


def names_a_teacher(path: str) -> bool:
    """Whether ``path`` alone names a teacher of this adapter, with no config: ``builtin:<name>`` or a folder."""
    return path.startswith(BUILTIN) or Path(path).is_dir()


def resolve_path(path: str) -> str:
    """``builtin:<name>`` -> the shipped folder ``sid/assets/<name>``; any other path unchanged."""
    if not path.startswith(BUILTIN):
        return path
    name = path[len(BUILTIN):]
    if name not in builtin_teachers():
        raise SidError(f"no built-in teacher {name!r}; the package ships: {', '.join(builtin_teachers()) or 'none'}")
    return str(ASSETS / name)


class DiscreteVPRule(nn.Module):
    """A VP network on diffusers' discrete schedule in EDM units: σ_k = sqrt((1 - ā_k) / ā_k) for ā =
    ``alphas_cumprod``, x_t = x / sqrt(1 + σ²), and the network's ε, v or x0 turned into x0 (Karras et al. 2022,
    Table 1's VP column on a discrete grid; v-prediction: Salimans & Ho 2022).

    Continuous σ maps to a fractional timestep by linear interpolation of k in ln σ.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, sigma_data: float = 0.5):
        super().__init__()
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        log_sigmas = ((1 - ac) / ac).sqrt().log()                                  # [K], increasing in k
        if ac[-1] <= 0:
            # A zero-terminal-SNR schedule (rescale_betas_zero_snr) ends at ā = 0, σ = ∞. diffusers' Euler clips
            # ā there to 2^-24, which puts σ_999 below σ_998; a map σ <-> t needs σ increasing, so the last σ is
            # extrapolated in ln σ from the two before it instead.
            log_sigmas[-1] = 2 * log_sigmas[-2] - log_sigmas[-3]
        self.register_buffer("log_sigmas", log_sigmas)
        self.prediction_type, self.sigma_data = prediction_type, sigma_data
        self.sigma_min, self.sigma_max = float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.double().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo_val, hi_val = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        return (hi - 1 + (log_sigma - lo_val) / (hi_val - lo_val)).to(sigma.dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double().clamp(0, len(self.log_sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        frac = t - lo
        return ((1 - frac) * self.log_sigmas[lo] + frac * self.log_sigmas[lo + 1]).exp()

    def training_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """ε-MSE, 1/σ², for ε-networks; for v-networks v-MSE × snr/(snr + 1) (SiD-LSG), which is the same 1/σ²
        (x0 − D = sqrt(1 − ā) (v̂ − v), snr = 1/σ²); x0-MSE, 1, for "sample" networks."""
        return torch.ones_like(sigma) if self.prediction_type == "sample" else sigma**-2

    def timestep_sigmas(self) -> torch.Tensor:
        """σ_k = sqrt((1 − ā_k) / ā_k), k = 0 .. K − 1 (float32, on the rule's device)."""
        return self.log_sigmas.exp().float()

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        total = 1 + sigma**2
        c_in, t = total.rsqrt(), self.sigma_to_t(sigma)
        if self.prediction_type == "epsilon":                    # x0 = x - σ ε
            c_skip, c_out = torch.ones_like(sigma), -sigma
        elif self.prediction_type == "v_prediction":             # x0 = x / (1 + σ²) - σ v / sqrt(1 + σ²)
            c_skip, c_out = 1 / total, -sigma * c_in
        else:                                                    # "sample": the network predicts x0
            c_skip, c_out = torch.zeros_like(sigma), torch.ones_like(sigma)
        return Coefficients(c_skip, c_out, c_in, t)


class UNetBackbone(nn.Module):
    """``F(x_in, c_noise, labels)`` over a diffusers UNet2DModel or UNet2DConditionModel (class labels only)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.cross_attention_dim = getattr(unet.config, "cross_attention_dim", None)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {}
        if labels is not None:
            kwargs["class_labels"] = labels.argmax(dim=1)        # one-hot in the contract, indices in diffusers
        if self.cross_attention_dim is not None:                  # unconditional text context
            kwargs["encoder_hidden_states"] = x_in.new_zeros(x_in.shape[0], 1, self.cross_attention_dim,
                                                             dtype=self.unet.dtype)
        return self.unet(x_in.to(self.unet.dtype), c_noise, return_dict=False, **kwargs)[0]


def _unet_class(name: str):
    import diffusers

    if name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise SidError(f"teacher class {name!r} is not supported; use a UNet2DModel or UNet2DConditionModel folder "
                       "(a DiT: its DiTPipeline folder)")
    return getattr(diffusers, name)


class EDMVPredictionRule(EDMRule):
    """diffusers' EDM schedulers with ``prediction_type="v_prediction"``: the network outputs -F, so c_out
    changes sign (D = c_skip x - c_out F); everything else is EDM's rule."""

    def forward(self, sigma: torch.Tensor) -> Coefficients:
        c = super().forward(sigma)
        return c._replace(c_out=-c.c_out)


def edm_output(scheduler_config: dict | None) -> str:
    """What an EDM-preconditioned UNet outputs: its EDM scheduler's ``prediction_type``, else ε."""
    cfg = scheduler_config or {}
    return cfg.get("prediction_type", "epsilon") if cfg.get("_class_name") in EDM_SCHEDULERS else "epsilon"


def denoiser_from_unet(unet: nn.Module, prediction_type: str, scheduler_config: dict | None, sigma_data: float):
    """Wrap a diffusers UNet with the coefficient rule of its parameterisation."""
    label_dim = unet.config.num_class_embeds or 0
    return Preconditioned(UNetBackbone(unet), rule_of(prediction_type, scheduler_config, sigma_data),
                          label_dim=label_dim)


def rule_of(prediction_type: str, scheduler_config: dict | None, sigma_data: float = 0.5):
    """The coefficient rule of a diffusers model's parameterisation and scheduler."""
    if prediction_type not in PREDICTION_TYPES:
        raise SidError(f"prediction_type={prediction_type!r} is unknown; choose one of {PREDICTION_TYPES}")
    if prediction_type == "edm":
        cfg = scheduler_config or {}
        output = edm_output(cfg)
        if output not in ("epsilon", "v_prediction"):
            raise SidError(f"EDM scheduler with prediction_type={output!r}: only epsilon and v_prediction are defined")
        rule_class = EDMVPredictionRule if output == "v_prediction" else EDMRule
        rule = rule_class(cfg.get("sigma_data", sigma_data), cfg.get("sigma_min", 0.002), cfg.get("sigma_max", 80.0))
    elif prediction_type == "flow":
        rule = FlowRule((scheduler_config or {}).get("num_train_timesteps", 1000), sigma_data=sigma_data)
    else:
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_config(scheduler_config or {}).alphas_cumprod
        rule = DiscreteVPRule(alphas_cumprod, prediction_type, sigma_data)
    return rule


def model_of(denoiser: Preconditioned) -> nn.Module:
    """The diffusers model inside a denoiser of this adapter: its UNet, or its transformer (DiT)."""
    net = denoiser.net
    return net.unet if hasattr(net, "unet") else net.transformer


def prediction_of(scheduler_config: dict | None) -> str:
    """What a model predicts, read from its scheduler's config: edm for EDM schedulers, flow for flow-matching
    ones (and DPM-Solver's ``flow_prediction``, as Sana's), else the config's prediction_type (ε by default)."""
    sched = scheduler_config or {}
    kind = sched.get("_class_name")
    flow = kind in FLOW_SCHEDULERS or sched.get("prediction_type") == "flow_prediction"    # DPM-Solver on flows
    return "edm" if kind in EDM_SCHEDULERS else "flow" if flow else sched.get("prediction_type", "epsilon")


def spec_of(denoiser: Preconditioned, prediction_type: str, scheduler_config: dict | None) -> dict:
    """What rebuilds this denoiser's architecture without the weights (stored with exported generators)."""
    unet = model_of(denoiser)
    return {
        "kind": "diffusers",
        "class_name": type(unet).__name__,
        "unet_config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "prediction_type": prediction_type,
        "scheduler_config": scheduler_config,
        "sigma_data": denoiser.sigma_data,
    }


def denoiser_from_spec(spec: dict, trust_code: bool = False) -> Preconditioned:
    """An exported generator's architecture (random weights): the UNet class and config its spec names (with
    the text backbone for a latent text-to-image pipeline's)."""
    if spec.get("pipeline") in LATENT_PIPELINES:
        from sid.teachers.latent import denoiser_from_spec as text_denoiser_from_spec

        return text_denoiser_from_spec(spec)
    return denoiser_from_unet(backbone_from_spec(spec), spec["prediction_type"], spec["scheduler_config"],
                              spec["sigma_data"])


def backbone_from_spec(spec: dict) -> nn.Module:
    """The network alone (no schedule), e.g. on the meta device to size it before anything is allocated: a
    latent pipeline's network of its family's class only, else a UNet."""
    family = LATENT_FAMILIES.get(spec.get("pipeline"))
    if family is not None and spec["class_name"] == family.model:
        import diffusers

        return getattr(diffusers, family.model).from_config(spec["unet_config"])
    return _unet_class(spec["class_name"]).from_config(spec["unet_config"])


def sample_shape(denoiser: Preconditioned) -> tuple[int, ...]:
    """One sample's shape for a UNet denoiser of this adapter: (channels, height, width)."""
    config = model_of(denoiser).config
    size = config.sample_size
    return (config.in_channels, *((size, size) if isinstance(size, int) else size))


def checkpoint_blocks(net: nn.Module) -> None:
    """``perf.grad_checkpointing`` for a network holding diffusers models: their own checkpointing, block by block
    (``enable_gradient_checkpointing``)."""
    from diffusers import ModelMixin

    for module in net.modules():
        if isinstance(module, ModelMixin):
            module.enable_gradient_checkpointing()


class DiffusersTeacher(Teacher):
    """A diffusers UNet teacher: one sample's shape is the UNet's, and activation checkpointing is the UNet's own,
    block by block."""

    def __init__(self, denoiser: Preconditioned, spec: dict):
        super().__init__(denoiser, sample_shape(denoiser), spec)

    def checkpoint_activations(self, net: nn.Module) -> None:
        checkpoint_blocks(net)

    def lora_target(self, net: nn.Module) -> nn.Module:
        """The diffusers model itself: adapter keys as diffusers and peft name them for it."""
        return model_of(net)


def build(section, trust_code: bool = False) -> Teacher:
    """The teacher of ``teacher.diffusers``: a local folder, a hub id, ``builtin:<name>``, or a random UNet; a
    latent pipeline folder (``LATENT_PIPELINES``) with its VAE and text encoders."""
    found = latent_pipeline(section)
    if found is not None:
        from sid.teachers.latent import load

        return load(*found, section.resolution)
    if section.resolution is not None:
        raise SidError("teacher.diffusers.resolution is for latent pipelines (their VAE decodes any multiple of its "
                       "factor); this pixel-space teacher draws at its own size: leave it null")
    unet_config = plain(section.unet_config) if section.unet_config else None
    return DiffusersTeacher(*load_denoiser(section.path, unet_config, section.prediction_type, section.sigma_data))


def latent_pipeline(section, weights: bool = True) -> tuple[Path, dict] | None:
    """(folder, index) of the latent pipeline ``teacher.diffusers.path`` names (a folder, or a hub id fetched with
    or without its weights), or None for any other teacher of this adapter."""
    root = Path(resolve_path(section.path)) if section.path else None
    index = _read_json(root / "model_index.json") if root is not None and root.is_dir() else None
    if root is not None and not root.exists() and is_hub_id(section.path):
        root, index = hub_latent_pipeline(section.path, weights) or (root, None)
    return (root, index) if index and index.get("_class_name") in LATENT_PIPELINES else None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SidError(f"{path} is not valid JSON ({e}); restore it from the model's source") from None


# Pipelines whose teacher this adapter does not (yet) distil, by class or by the components they hold.
LATENT_COMPONENTS = ("vae", "vqvae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
UNSUPPORTED = {"ScoreSdeVePipeline": "its UNet predicts a scaled score on a continuous VE schedule, not ε, v, x0, "
                                     "EDM or flow", "ScoreSdeVeScheduler": "a VE score-SDE schedule"}
# Latent pipelines (text-to-image, class-conditional), read by sid/teachers/latent.py (which imports diffusers
# only when loading).
LATENT_PIPELINES = tuple(LATENT_FAMILIES)
SUPPORTED = ("UNet2DModel and class-conditional UNet2DConditionModel folders, or pipelines holding one in unet/ "
             "with a DDPM/DDIM/Euler, EDM or flow-matching scheduler (DDPMPipeline, DDIMPipeline, ...); "
             f"latent pipeline folders or hub ids: {', '.join(LATENT_PIPELINES)}")


def check_pipeline(index: dict | None, scheduler_config: dict | None, where: str) -> None:
    """Refuse, in one line, a pipeline this adapter would distil wrongly: a latent or text-conditioned one (its
    VAE and encoders ignored, latents drawn as images) or a VE score-SDE one."""
    name = (index or {}).get("_class_name", "")
    latent = [c for c in LATENT_COMPONENTS if (index or {}).get(c) and (index or {}).get(c) != [None, None]]
    if latent:
        raise SidError(f"{where} is a {name or 'pipeline'} with {', '.join(latent)}: a latent or text-conditioned "
                       f"pipeline this version does not read (or its UNet alone); supported: {SUPPORTED}")
    scheduler = (scheduler_config or {}).get("_class_name", "")
    for what in (name, scheduler):
        if what in UNSUPPORTED:
            raise SidError(f"{where} is a {what} ({UNSUPPORTED[what]}), which sid does not distil; supported: "
                           f"{SUPPORTED}")


def _load_local(root: Path):
    index = _read_json(root / "model_index.json") if root.is_dir() else None
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    config = _read_json(unet_dir / "config.json")
    if config is None and root.is_file():
        raise SidError(f"teacher path {root} is a file; teacher.kind=diffusers needs a diffusers folder "
                       "(an EDM .pkl file is teacher.kind=edm_pickle)")
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json") or _read_json(
        root / "scheduler_config.json"
    )
    check_pipeline(index, scheduler_config, f"teacher folder {root}")
    if config is None and index is not None:
        raise SidError(f"teacher folder {root} is a {index.get('_class_name', 'pipeline')} without a unet/; "
                       f"supported: {SUPPORTED}")
    if config is None:
        raise SidError(f"teacher folder {root} has no config.json (nor unet/config.json); give a diffusers folder")
    try:
        unet = _unet_class(config.get("_class_name", "UNet2DModel")).from_pretrained(unet_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"cannot load the teacher weights in {unet_dir}: {str(e).splitlines()[0]}") from None
    return unet, scheduler_config


def _load_hub(path: str):
    """A hub model, ``owner/name`` or ``owner/name@revision`` (a branch, tag or commit), from the local Hugging
    Face cache when it is all there (no requests to the hub: fast, and works offline), else from the hub."""
    repo_id, _, revision = path.partition("@")
    try:
        cached = _fetch_hub(repo_id, revision or None, local_files_only=True)
    except SidError:                        # found, and refused
        raise
    except Exception:  # not (all) in the cache
        cached = None
    if cached is not None and cached[1] is not None:
        return cached
    try:
        return _fetch_hub(repo_id, revision or None, local_files_only=False)
    except SidError:
        raise
    except Exception as e:  # hub errors come in many types; all mean the same to the user
        if cached is not None:              # the UNet was cached, without a scheduler: use it as it is
            return cached
        raise SidError(
            f"teacher {path!r} is neither a local folder nor a reachable hub model ({type(e).__name__}); "
            "check the path (and revision), or download the model while online"
        ) from None


def _fetch_hub(repo_id: str, revision: str | None, local_files_only: bool):
    """The UNet of a hub repository (its own class, as its config names it) and its scheduler's config; a
    pipeline this adapter does not distil is refused as a local folder is."""
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel

    where = {"revision": revision, "local_files_only": local_files_only}
    try:
        index = dict(DiffusionPipeline.load_config(repo_id, **where))
    except (OSError, EnvironmentError, ValueError):
        index = None
    try:
        scheduler_config = dict(DDPMScheduler.load_config(repo_id, subfolder="scheduler", **where))
    except (OSError, EnvironmentError):
        scheduler_config = None
    check_pipeline(index, scheduler_config, f"hub model {repo_id}")
    try:
        subfolder, config = "unet", UNet2DModel.load_config(repo_id, subfolder="unet", **where)
    except (OSError, EnvironmentError):
        subfolder, config = None, UNet2DModel.load_config(repo_id, **where)
    unet_class = _unet_class(dict(config).get("_class_name", "UNet2DModel"))
    unet = unet_class.from_pretrained(repo_id, **({"subfolder": subfolder} if subfolder else {}), **where)
    return unet, scheduler_config


def is_hub_id(path: str) -> bool:
    """``owner/name[@revision]`` that is not a local path (``runs/mine`` with ``runs/`` here: a mistyped folder)."""
    return not (path.startswith((".", "/", "~")) or path.partition("@")[0].count("/") != 1
                or Path(path.split("/")[0]).is_dir())


def hub_latent_pipeline(path: str, weights: bool = True) -> tuple[Path, dict] | None:
    """A hub id naming a latent text-to-image pipeline (``LATENT_PIPELINES``): its folder, with the components
    the pipeline needs (safetensors weights, configs, tokenizer files) from the local cache when the hub cannot
    be reached, else downloaded; and its index. None for a hub model that is not such a pipeline."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import snapshot_download

    from sid.teachers.latent import COMPONENTS

    repo_id, _, revision = path.partition("@")
    index = None
    for local in (True, False):                        # the cache first: no request when it is there
        try:
            index = dict(DiffusionPipeline.load_config(repo_id, revision=revision or None, local_files_only=local))
            break
        except Exception:                              # not cached, offline, or not a pipeline: the UNet path decides
            continue
    name = (index or {}).get("_class_name")
    if name not in LATENT_PIPELINES:
        return None
    files = ("*.json", "*.txt", "*.model")                                  # configs, vocabularies
    if weights:
        files += ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model-*-of-*"
                  ".safetensors", "model-*-of-*.safetensors")
    patterns = ["model_index.json", *(f"{c}/{f}" for c in COMPONENTS[name] for f in files)]
    for local in (False, True):
        try:
            return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                          local_files_only=local)), index
        except Exception as e:                         # hub errors come in many types
            error = e
    raise SidError(f"hub model {repo_id} is a {name} whose components could not be downloaded nor found in the "
                   f"cache ({type(error).__name__}); go online once, or give a local folder")


def load_denoiser(path: str | None, unet_config: dict | None, prediction_type: str | None, sigma_data: float):
    """A teacher denoiser from a local diffusers folder, a hub id, or (tests, smoke runs) a random UNet config.

    Returns ``(denoiser, spec)``.
    """
    if path is None and not unet_config:
        raise SidError("teacher.diffusers needs a path (local folder or hub id) or a unet_config to build from")
    if path is None:
        unet, scheduler_config = _unet_class(unet_config.get("_class_name", "UNet2DModel")).from_config(
            {k: v for k, v in unet_config.items() if k != "_class_name"}
        ), None
    elif Path(path := resolve_path(path)).exists():
        unet, scheduler_config = _load_local(Path(path))
    elif not is_hub_id(path):
        raise SidError(f"teacher path {path!r} does not exist; give a local diffusers folder or a hub id "
                       "(owner/name, or owner/name@revision)")
    else:
        unet, scheduler_config = _load_hub(path)
    prediction_type = prediction_type or prediction_of(scheduler_config)
    denoiser = denoiser_from_unet(unet, prediction_type, scheduler_config, sigma_data)
    return denoiser, spec_of(denoiser, prediction_type, scheduler_config)


def denoiser_from_config(unet_config: dict, prediction_type: str, sigma_data: float) -> Preconditioned:
    """A randomly initialised UNet2DModel (or ``_class_name``) from its config under the rule of
    ``prediction_type``: what ``sid teacher`` trains."""
    try:
        return load_denoiser(None, unet_config, prediction_type, sigma_data)[0]
    except (TypeError, ValueError) as e:
        raise SidError(f"unet config rejected by diffusers: {str(e).splitlines()[0][:200]}") from None


def save_teacher(denoiser: Preconditioned, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an EDM-preconditioned or flow-matching UNet as a diffusers folder: ``unet/`` and, in ``scheduler/``,
    an ``EDMEulerScheduler`` or ``FlowMatchEulerDiscreteScheduler`` config, from which ``teacher.diffusers.path``
    loads it back as ``prediction_type=edm`` or ``flow``. ``dtype``: store the weights in it (float16 halves the
    file); they load back as float32."""
    from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(f".tmp-{out_dir.name}"), out_dir.with_name(f".old-{out_dir.name}")
    unet = denoiser.net.unet if dtype is None else copy.deepcopy(denoiser.net.unet).to(dtype)
    rule = denoiser.rule
    try:                                    # written beside, then swapped in: a failed save keeps the last export
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        if isinstance(rule, FlowRule):
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(rule.timestep_scale))
        else:
            scheduler = EDMEulerScheduler(sigma_min=rule.sigma_min, sigma_max=rule.sigma_max,
                                          sigma_data=rule.sigma_data)
        scheduler.save_pretrained(tmp / "scheduler")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError as e:
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise SidError(f"could not export the teacher to {out_dir} ({e.strerror or e}); free space and resume") \
            from None
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
