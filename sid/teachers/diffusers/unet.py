"""Pixel-space diffusers UNets as teachers: a ``UNet2DModel`` (or class-conditional ``UNet2DConditionModel``) folder,
a hub id or a config, under the rule of its scheduler; and the teacher ``sid teacher`` trains, written back as a
diffusers folder."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import diffusers
import torch
from torch import nn

from sid.config import plain
from sid.errors import SidError, first_line
from sid.precond import FlowRule, Preconditioned
from sid.teachers.diffusers.families import FAMILIES
from sid.teachers.diffusers.files import hub_calls, hub_unreachable, is_hub_id, read_json, resolve_path
from sid.teachers.diffusers.models import DiffusersTeacher, model_of, own_shape, spec_of
from sid.teachers.diffusers.rules import prediction_of, rule_of

# Pipelines this adapter does not distil, by class or by the components they hold.
LATENT_COMPONENTS = ("vae", "vqvae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
UNSUPPORTED = {"ScoreSdeVePipeline": "its UNet predicts a scaled score on a continuous VE schedule, not ε, v, x0, "
                                     "EDM or flow", "ScoreSdeVeScheduler": "a VE score-SDE schedule"}
SUPPORTED = ("UNet2DModel and class-conditional UNet2DConditionModel folders, or pipelines holding one in unet/ "
             "with a DDPM/DDIM/Euler, EDM or flow-matching scheduler (DDPMPipeline, DDIMPipeline, ...); "
             f"latent pipeline folders or hub ids: {', '.join(FAMILIES)}")


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


def unet_class(name: str):
    if name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise SidError(f"teacher class {name!r} is not supported; use a UNet2DModel or UNet2DConditionModel folder "
                       "(a DiT: its DiTPipeline folder)")
    return getattr(diffusers, name)


def denoiser_from_unet(unet: nn.Module, prediction_type: str, scheduler_config: dict | None, sigma_data: float):
    """Wrap a diffusers UNet with the coefficient rule of its parameterisation."""
    label_dim = unet.config.num_class_embeds or 0
    return Preconditioned(UNetBackbone(unet), rule_of(prediction_type, scheduler_config, sigma_data),
                          label_dim=label_dim)


def sample_shape(denoiser: Preconditioned) -> tuple[int, ...]:
    """One sample's shape for a UNet denoiser: (channels, height, width)."""
    return own_shape(model_of(denoiser))


def build(section) -> DiffusersTeacher:
    """The pixel-space teacher of ``teacher.diffusers``: a local folder, a hub id, ``builtin:<name>``, or a random
    UNet."""
    if section.resolution is not None:
        raise SidError("teacher.diffusers.resolution is for latent pipelines (their VAE decodes any multiple of its "
                       "factor); this pixel-space teacher draws at its own size: leave it null")
    unet_config = plain(section.unet_config) if section.unet_config else None
    denoiser, spec = load_denoiser(section.path, unet_config, section.prediction_type, section.sigma_data)
    return DiffusersTeacher(denoiser, sample_shape(denoiser), spec)


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
    index = read_json(root / "model_index.json") if root.is_dir() else None
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    config = read_json(unet_dir / "config.json")
    if config is None and root.is_file():
        raise SidError(f"teacher path {root} is a file; teacher.kind=diffusers needs a diffusers folder "
                       "(an EDM .pkl file is teacher.kind=edm_pickle)")
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json") or read_json(
        root / "scheduler_config.json"
    )
    check_pipeline(index, scheduler_config, f"teacher folder {root}")
    if config is None and index is not None:
        raise SidError(f"teacher folder {root} is a {index.get('_class_name', 'pipeline')} without a unet/; "
                       f"supported: {SUPPORTED}")
    if config is None:
        raise SidError(f"teacher folder {root} has no config.json (nor unet/config.json); give a diffusers folder")
    try:
        unet = unet_class(config.get("_class_name", "UNet2DModel")).from_pretrained(unet_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise SidError(f"cannot load the teacher weights in {unet_dir}: {first_line(e, 1000)}") from None
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
    offline = hub_unreachable()
    if offline and cached is not None:          # the UNet was cached, without a scheduler: use it as it is
        return cached
    if offline:
        raise SidError(f"teacher {path!r} is neither a local folder nor a reachable hub model: not in the "
                       f"Hugging Face cache, and the hub cannot be reached ({offline}); go online once to fetch it, or "
                       "give a local folder")
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
    where = {"revision": revision, "local_files_only": local_files_only}
    with hub_calls():
        try:
            index = dict(diffusers.DiffusionPipeline.load_config(repo_id, **where))
        except (OSError, EnvironmentError, ValueError):
            index = None
        try:
            scheduler_config = dict(diffusers.DDPMScheduler.load_config(repo_id, subfolder="scheduler", **where))
        except (OSError, EnvironmentError):
            scheduler_config = None
        check_pipeline(index, scheduler_config, f"hub model {repo_id}")
        try:
            subfolder, config = "unet", diffusers.UNet2DModel.load_config(repo_id, subfolder="unet", **where)
        except (OSError, EnvironmentError):
            subfolder, config = None, diffusers.UNet2DModel.load_config(repo_id, **where)
        cls = unet_class(dict(config).get("_class_name", "UNet2DModel"))
        return cls.from_pretrained(repo_id, **({"subfolder": subfolder} if subfolder else {}), **where), \
            scheduler_config


def load_denoiser(path: str | None, unet_config: dict | None, prediction_type: str | None, sigma_data: float):
    """A teacher denoiser from a local diffusers folder, a hub id, or (tests, smoke runs) a random UNet config.

    Returns ``(denoiser, spec)``.
    """
    if path is None and not unet_config:
        raise SidError("teacher.diffusers needs a path (local folder or hub id) or a unet_config to build from")
    if path is None:
        unet, scheduler_config = unet_class(unet_config.get("_class_name", "UNet2DModel")).from_config(
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
        raise SidError(f"unet config rejected by diffusers: {first_line(e, 200)}") from None


def save_teacher(denoiser: Preconditioned, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an EDM-preconditioned or flow-matching UNet as a diffusers folder: ``unet/`` and, in ``scheduler/``,
    an ``EDMEulerScheduler`` or ``FlowMatchEulerDiscreteScheduler`` config, from which ``teacher.diffusers.path``
    loads it back as ``prediction_type=edm`` or ``flow``. ``dtype``: store the weights in it (float16 halves the
    file); they load back as float32."""
    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(f".tmp-{out_dir.name}"), out_dir.with_name(f".old-{out_dir.name}")
    unet = denoiser.net.unet if dtype is None else copy.deepcopy(denoiser.net.unet).to(dtype)
    rule = denoiser.rule
    try:                                    # written beside, then swapped in: a failed save keeps the last export
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        if isinstance(rule, FlowRule):
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(rule.timestep_scale))
        else:
            scheduler = diffusers.EDMEulerScheduler(sigma_min=rule.sigma_min, sigma_max=rule.sigma_max,
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
