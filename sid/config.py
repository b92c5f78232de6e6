"""The configuration: a typed schema, YAML presets that only override, dotted CLI overrides, validation.

``load_config(["fmnist"], ["loss.lam=1.0"])`` merges schema defaults < each YAML (a file, or a preset shipped
in ``configs/``, installed as ``sid.configs``) < the dotlist, validates every value, and returns a read-only config.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from sid.errors import SidError


@dataclass
class AnalyticTeacherConfig:
    shape: list[int] = field(default_factory=lambda: [2])  # sample shape, e.g. [2] or [1, 8, 8]
    modes: int = 8                       # number of mixture components
    radius: float = 2.0                  # distance of the component means from the origin
    mode_std: float = 0.2                # standard deviation of every component
    weights: list[float] = field(default_factory=list)  # mixture weights (empty: equal)
    seed: int = 0                        # places the means when shape is not [2]
    student_width: int = 128             # MLP width of the generator and fake score
    student_depth: int = 3               # MLP hidden layers
    student_fit_steps: int = 1000        # steps fitting the MLP to the exact denoiser (the "teacher init")


@dataclass
class DiffusersTeacherConfig:
    path: Optional[str] = None           # local diffusers folder (model or pipeline), hub id, or builtin:<name>
    unet_config: Optional[dict[str, Any]] = None  # instead of path: a random UNet from this config (tests)
    prediction_type: Optional[str] = None  # epsilon | v_prediction | sample | edm | flow; null: from the scheduler
    sigma_data: float = 0.5              # data std assumed by EDM preconditioning and the fake-score weight
    resolution: Optional[int] = None     # latent pipelines: square images of this many pixels (SiD-DiT: SD3 at
                                         # 512); null: the network's own sample size


@dataclass
class EDMPickleTeacherConfig:
    path: Optional[str] = None           # an NVIDIA EDM pickle (edm-*.pkl, network-snapshot-*.pkl): a file or URL
    sigma_data: float = 0.5              # fake-score loss weight for VP/VE networks (EDM's EDMPrecond brings its own)
    dropout: Optional[float] = None      # the dropout rate of the students' blocks; null: the pickled network's


@dataclass
class PythonTeacherConfig:
    factory: Optional[str] = None        # package.module:function returning the denoiser (sid/teachers/python.py)
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments for it (JSON-able)
    shape: list[int] = field(default_factory=list)        # one sample's shape, e.g. [3, 32, 32]


@dataclass
class TeacherConfig:
    kind: str = "analytic"               # one of the sections below, each an adapter sid/teachers/<kind>.py
    analytic: AnalyticTeacherConfig = field(default_factory=AnalyticTeacherConfig)
    diffusers: DiffusersTeacherConfig = field(default_factory=DiffusersTeacherConfig)
    edm_pickle: EDMPickleTeacherConfig = field(default_factory=EDMPickleTeacherConfig)
    python: PythonTeacherConfig = field(default_factory=PythonTeacherConfig)


@dataclass
class GeneratorConfig:
    sigma_init: float = 2.5              # G(z) = D_θ(sigma_init z, sigma_init)
    t_init: Optional[int] = None         # discrete teachers: sigma_init = σ of this timestep (SiD-LSG: 625 = σ 2.5017)


@dataclass
class LossConfig:
    lam: str = "sid"                     # λ: sid (1.2) | lambda1 (1.0) | fgm (0.5) | l2 (0) | any number
    weighting: str = "sid"               # sid: 1/mean|x_g - f_φ| | x0: 1 | eps: 1/σ² | one_minus_t: 1 − t (SiD-DiT)
                                         # | velocity: 2/t² (λ = ½: FGM's velocity loss), t = σ / (1 + σ)
    time: str = "karras"                 # σ of both steps: karras (SiD: generator Karras u < t_max, fake score
                                         # log-normal) | timesteps (SiD-LSG: the teacher's own discrete
                                         # timesteps in loss.timesteps) | logit_normal (SiD-DiT: ln σ = logit t
                                         # ~ N(p_mean, p_std²) in both steps)
    timesteps: list[int] = field(default_factory=lambda: [20, 979])  # time=timesteps: k ~ U{lo..hi}
    fake_loss: str = "edm"               # the fake score's denoising loss: edm (λ_EDM weight) | native (the
                                         # teacher's own: ε-MSE, v-MSE·snr/(snr+1), velocity MSE)
    t_max: float = 0.8                   # generator-loss σ from the Karras schedule at u < t_max (SiD: 800/1000)
    sigma_min: Optional[float] = None    # Karras range of the generator loss; null: the teacher's
    sigma_max: Optional[float] = None
    rho: float = 7.0
    p_mean: float = -1.2                 # fake-score loss: ln σ ~ N(p_mean, p_std²)
    p_std: float = 1.2
    g_scale: float = 100.0               # generator loss multiplier (SiD's lsg)
    fake_scale: float = 1.0              # fake-score loss multiplier (SiD's ls)
    augment: float = 0.0                 # fake-score step: EDM's geometric augmentation, this probability per
                                         # transform (SiD CIFAR-10: 0.12); networks with augment labels only
    reuse_generator_batch: bool = False  # fake step fits the last generator step's x_g: one G forward fewer
    # Classifier-free guidance inside the loss, D_κ = D_u + κ (D_c − D_u) (SiD-LSG's four scales, κ2 = κ3);
    # 1: none. Conditional teachers with a null condition only.
    guide_fake_train: float = 1.0        # κ1: the fake score's own output in its denoising loss
    guide_fake: float = 1.0              # κ2 = κ3: the fake score in the generator loss
    guide_teacher: float = 1.0           # κ4: the teacher in the generator loss
    drop_cond: float = 0.1               # the fake step's conditions replaced by the null one at this rate,
                                         # when guide_fake_train or guide_fake differs from 1 (SiD-LSG)


@dataclass
class ConditionsConfig:
    """What the generator is asked for, data-free (sid/conditions.py)."""

    prompts: Optional[str] = None        # text-to-image teachers: a text file, one prompt per line, or .jsonl
                                         # ({"prompt": ...} per line); shuffled anew each pass, resumable
    cache: Optional[str] = None          # text-to-image: every prompt's embedding, encoded once into this
                                         # .safetensors file (made when missing; small prompt sets)
    class_probs: list[float] = field(default_factory=list)  # class-conditional teachers: each class's
                                         # probability (normalised); empty: uniform


@dataclass
class LoraConfig:
    """Students as LoRA adapters over the frozen teacher's weights (peft; sid/lora.py) instead of full copies."""

    fake_score: bool = False             # the fake score as adapters (SiD-LSG's LoRA option)
    generator: bool = False              # the generator as adapters (exported merged into a full network)
    rank: int = 64                       # r of the adapters' B A
    alpha: Optional[float] = None        # their scale is alpha / rank; null: alpha = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # module names (or
                                         # name suffixes) that get adapters: diffusers' attention projections
    save_adapter: bool = False           # also write the generator's adapter alone (peft format) in generator/adapter


@dataclass
class OptimConfig:
    batch: int = 256                     # images per iteration, all processes together
    batch_gpu: Optional[int] = None      # per-process micro-batch; null: batch / processes (no accumulation)
    g_lr: float = 1e-5                   # generator Adam learning rate (SiD's glr)
    fake_lr: float = 1e-5                # fake-score Adam learning rate (SiD's lr)
    g_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    fake_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    eps: float = 1e-8


@dataclass
class EMAConfig:
    halflife_nimg: float = 500_000       # EMA half-life in images (SiD: 0.5 Mimg); 0 disables
    rampup: float = 0.05                 # half-life <= rampup * images seen


@dataclass
class TrainConfig:
    run_dir: str = "runs/sid"            # checkpoints, exports, samples, metrics, resolved config
    total_nimg: int = 10_000_000         # stop after this many generator images
    max_seconds: float = 0               # also stop (checkpointed) after this long in this invocation; 0: off
    seed: int = 0
    precision: str = "auto"              # auto (bf16 on GPUs, fp32 on CPUs) | fp32 | bf16 (autocast, fp32 masters)
    log_every_nimg: int = 25_600         # metrics to metrics.jsonl and the tracker
    sample_every_nimg: int = 256_000     # sample grid of the EMA generator
    ckpt_every_nimg: int = 1_024_000     # training state + exported generator
    keep_ckpts: int = 2                  # training states kept on disk
    num_samples: int = 64                # images in each sample grid
    max_nonfinite_steps: int = 20        # abort after this many consecutive steps with non-finite values
    tracker: str = "auto"                # auto (TensorBoard when installed) | none | one of TRACKERS
    progress: bool = True                # progress bar on the main process


@dataclass
class PerfConfig:
    """How fast, never what is computed (up to rounding)."""

    tf32: bool = True                    # CUDA: TF32 for the matmuls and convolutions that stay fp32
    channels_last: bool = False          # NHWC memory format for the three networks
    fused_adam: bool = True              # fused Adam kernels (else PyTorch's default foreach)
    teacher_bf16: bool = True            # with bf16 precision, store the frozen teacher's weights in bf16
    compile: Optional[bool] = None       # torch.compile the teacher, fake score and generator; null: on GPUs
    grad_checkpointing: bool = False     # recompute activations in backward (UNets per block, else whole)
    offload_codec: bool = False          # latent teachers: the VAE and text encoder wait on the CPU and visit the
                                         # accelerator only to encode or decode (best with conditions.cache)


@dataclass
class EvalConfig:
    every_nimg: int = 0                  # in-loop quality of the EMA generator every this many images; 0: off.
                                         # Image teachers: proxy FID; analytic teachers: sliced Wasserstein.
                                         # The best so far is exported to <run_dir>/generator-best.
    num: int = 10_000                    # generated samples per evaluation (fixed seeds)
    fid_ref: Optional[str] = None        # reference statistics (.npz with mu, sigma: `sid fid ref`)
    fid_weights: str = "auto"            # auto | torchmetrics | path to a TorchScript feature extractor
    prompts: Optional[str] = None        # text-to-image: the prompts image i is drawn for (i mod their number;
                                         # e.g. COCO captions); null: conditions.prompts in its order
    resolution: Optional[int] = None     # text-to-image: images resized to this square size for FID and CLIP
                                         # (SiD-LSG: 256); null: as generated
    clip: Optional[str] = None           # text-to-image: a CLIP model folder (or hub id) for the CLIP score too


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    conditions: ConditionsConfig = field(default_factory=ConditionsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Settings applied only when no GPU is visible, as a partial config (e.g. {train: {max_seconds: 240}}):
    # one preset gives a short bounded run on a laptop and the full run on a GPU. The command line still wins.
    on_cpu: dict[str, Any] = field(default_factory=dict)


# The teacher kinds: one section of TeacherConfig each (and one adapter module, sid/teachers/<kind>.py).
TEACHER_KINDS = tuple(f.name for f in fields(TeacherConfig) if f.name != "kind")

# λ of the generator loss L_λ = w <f_φ - f_ψ, (f_φ - x_g) - λ (f_φ - f_ψ)> by name (docs/losses.md); λ is SiD's α.
LAMBDA_PRESETS = {
    "sid": 1.2,       # SiD's default: ½Q - 0.2P
    "lambda1": 1.0,   # the fake-score channel alone, ½Q (SiD-LSG, SiDA, FGM in practice)
    "fgm": 0.5,       # the exact gradient ½∇D; ½(|f_φ - x_g|² - |f_ψ - x_g|²)
    "l2": 0.0,        # SiD's L2 alone, ½Q + P
}


def resolve_lam(lam: str | float) -> float:
    """``loss.lam`` as it is written (a preset name or a number) -> λ."""
    if str(lam) in LAMBDA_PRESETS:
        return LAMBDA_PRESETS[str(lam)]
    try:
        return float(lam)
    except ValueError:
        raise SidError(f"loss.lam={lam!r} is neither a number nor a preset; presets: {LAMBDA_PRESETS}") from None


# Accelerate's trackers (``log_with``), by the names Accelerate gives them.
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")
CHOICES = {
    "teacher.kind": TEACHER_KINDS,
    "teacher.diffusers.prediction_type": (None, "epsilon", "v_prediction", "sample", "edm", "flow"),
    "loss.weighting": ("sid", "x0", "eps", "one_minus_t", "velocity"),
    "loss.time": ("karras", "timesteps", "logit_normal"),
    "loss.fake_loss": ("edm", "native"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.tracker": ("auto", "none", *TRACKERS),
}
# Every number of the distillation config and its valid range: (key, test, the range as the error line says it).
def _positive(v): return v > 0                                                       # noqa: E704
def _count(v): return isinstance(v, int) and v >= 1                                  # noqa: E704


RANGES = [
    ("optim.batch", _count, "a positive integer"),
    ("lora.rank", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    ("lora.alpha", lambda v: v is None or v > 0, "> 0, or null for the rank"),
    ("lora.targets", lambda v: len(v) > 0 and all(isinstance(t, str) and t for t in v), "a list of module names"),
    ("optim.g_lr", _positive, "> 0"), ("optim.fake_lr", _positive, "> 0"), ("optim.eps", _positive, "> 0"),
    ("generator.sigma_init", _positive, "> 0"),
    ("loss.rho", _positive, "> 0"), ("loss.p_std", _positive, "> 0"),
    ("loss.g_scale", _positive, "> 0"), ("loss.fake_scale", _positive, "> 0"),
    ("loss.t_max", lambda v: 0 < v <= 1, "in (0, 1] (a fraction of the Karras schedule)"),
    ("loss.timesteps", lambda v: len(v) == 2 and 0 <= v[0] <= v[1], "two timesteps lo <= hi, e.g. [20, 979]"),
    ("eval.resolution", lambda v: v is None or 8 <= v <= 4096, "in [8, 4096], or null for the generated size"),
    ("teacher.diffusers.resolution", lambda v: v is None or 8 <= v <= 8192,
     "in [8, 8192] pixels, or null for the network's own size"),
    ("generator.t_init", lambda v: v is None or v >= 0, "a timestep >= 0, or null for generator.sigma_init"),
    ("loss.augment", lambda v: 0 <= v <= 1, "in [0, 1] (a probability per transform; 0: off)"),
    *((f"loss.{key}", lambda v: 0 <= v <= 100, "in [0, 100] (a guidance scale; 1: none)")
      for key in ("guide_fake_train", "guide_fake", "guide_teacher")),
    ("loss.drop_cond", lambda v: 0 <= v < 1, "in [0, 1) (a probability)"),
    ("conditions.class_probs", lambda v: all(p >= 0 for p in v) and (not v or sum(v) > 0), "non-negative, not all 0"),
    ("loss.sigma_min", lambda v: v is None or v > 0, "> 0, or null for the teacher's"),
    ("loss.sigma_max", lambda v: v is None or v > 0, "> 0, or null for the teacher's"),
    ("ema.halflife_nimg", lambda v: v >= 0, ">= 0 (0: no EMA)"), ("ema.rampup", lambda v: v >= 0, ">= 0"),
    ("train.total_nimg", _count, "a positive integer"), ("train.log_every_nimg", _count, "a positive integer"),
    ("train.sample_every_nimg", _count, "a positive integer"), ("train.ckpt_every_nimg", _count, "a positive integer"),
    ("train.keep_ckpts", _count, "a positive integer"), ("train.num_samples", _count, "a positive integer"),
    ("train.max_nonfinite_steps", _count, "a positive integer"),
    ("train.max_seconds", lambda v: v >= 0, ">= 0 (0: off)"),
    ("train.seed", lambda v: 0 <= v < 2**63, "in [0, 2^63)"),
    ("eval.every_nimg", lambda v: v >= 0, ">= 0 (0: off)"), ("eval.num", lambda v: 2 <= v <= 10**7, "in [2, 10^7]"),
    ("teacher.analytic.modes", _count, "a positive integer"), ("teacher.analytic.mode_std", _positive, "> 0"),
    ("teacher.analytic.student_width", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    ("teacher.analytic.student_depth", lambda v: 1 <= v <= 64, "in [1, 64]"),
    ("teacher.analytic.student_fit_steps", lambda v: v >= 0, ">= 0"),
    ("teacher.analytic.shape", lambda v: len(v) >= 1 and all(1 <= s <= 4096 for s in v), "sizes in [1, 4096]"),
    ("teacher.python.shape", lambda v: all(1 <= s <= 4096 for s in v), "sizes in [1, 4096]"),
    ("teacher.analytic.weights", lambda v: all(w >= 0 for w in v) and (not v or sum(v) > 0), "non-negative, not all 0"),
    ("teacher.diffusers.sigma_data", _positive, "> 0"), ("teacher.edm_pickle.sigma_data", _positive, "> 0"),
    ("teacher.edm_pickle.dropout", lambda v: v is None or 0 <= v < 1, "in [0, 1), or null for the pickled rate"),
]


def check_ranges(cfg: DictConfig) -> None:
    """Every number finite, and each of ``RANGES`` in its range: else one line with the key and the range."""
    for key, value in _numbers(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(value, float) and not math.isfinite(value):
            raise SidError(f"{key}={value} must be a finite number")
    for key, test, valid in RANGES:
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        if not test(value):
            raise SidError(f"{key}={value!r} is out of range: it must be {valid}")
    for name in ("g_betas", "fake_betas"):
        betas = list(cfg.optim[name])
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise SidError(f"optim.{name}={betas} must be two numbers in [0, 1)")
    lo, hi = cfg.loss.sigma_min, cfg.loss.sigma_max
    if lo is not None and hi is not None and not lo < hi:
        raise SidError(f"loss.sigma_min={lo} must be below loss.sigma_max={hi}")
    batch, batch_gpu = cfg.optim.batch, cfg.optim.batch_gpu
    if batch_gpu is not None and not (1 <= batch_gpu <= batch and batch % batch_gpu == 0):
        raise SidError(f"optim.batch_gpu={batch_gpu} must be a positive divisor of optim.batch={batch}, or null")
    weights = list(cfg.teacher.analytic.weights)
    if weights and len(weights) != cfg.teacher.analytic.modes:
        raise SidError(f"teacher.analytic.weights has {len(weights)} values for teacher.analytic.modes="
                       f"{cfg.teacher.analytic.modes}: give one per mode, or none")


def _numbers(node, prefix: str = ""):
    """(dotted key, number) for every number in a nested container."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list)):
            yield from _numbers(v, key)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, v


def _valid_keys(node, prefix: str) -> str:
    keys = sorted(node.keys()) if isinstance(node, DictConfig) else []
    return f"valid keys under {prefix or 'the top level'}: {', '.join(keys)}"


def _friendly(e: OmegaConfBaseException, schema: DictConfig, source: str, moved: dict, removed: dict) -> SidError:
    key = getattr(e, "full_key", "") or ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    if isinstance(e, ConfigKeyError) and key in moved:
        return SidError(f"config key {key!r} in {source} is now {moved[key]!r}: write {moved[key]}=...")
    if isinstance(e, ConfigKeyError) and key in removed:
        return SidError(f"config key {key!r} in {source} is gone: {removed[key]}")
    if isinstance(e, ConfigKeyError):
        node = OmegaConf.select(schema, parent) if parent else schema
        return SidError(f"unknown config key {key!r} in {source}; {_valid_keys(node, parent)}")
    return SidError(f"bad value for config key {key!r} in {source}: {str(e).splitlines()[0]}")


@dataclass
class TeacherDataConfig:
    source: str = "fashion-mnist:train"  # fashion-mnist[:train|:test] | .npz of uint8 images | image folder
    xflip: bool = True                   # random horizontal flips


@dataclass
class TeacherLossConfig:
    objective: str = "edm"               # edm (EDM preconditioning and loss) | flow (rectified flow, velocity)
    sigma_data: float = 0.5
    p_mean: float = -1.2                 # ln σ ~ N(p_mean, p_std²); for flow, ln σ = logit t (SD3: 0 and 1)
    p_std: float = 1.2


@dataclass
class TeacherOptimConfig:
    batch: int = 256                     # images per iteration, all processes together
    lr: float = 1e-3                     # Adam learning rate, betas (0.9, 0.999)
    warmup_nimg: int = 200_000           # linear learning-rate warm-up


@dataclass
class TeacherRunConfig:
    run_dir: str = "runs/teacher"        # training-state-*/, teacher/ (diffusers folder), samples/, metrics.jsonl
    total_nimg: int = 20_000_000
    seed: int = 0
    precision: str = "auto"              # auto (bf16 on GPUs, fp32 on CPUs) | fp32 | bf16
    log_every_nimg: int = 51_200
    sample_every_nimg: int = 1_024_000
    ckpt_every_nimg: int = 2_048_000
    keep_ckpts: int = 2
    export_fp16: bool = True             # teacher/ weights stored in fp16 (half the size; they load as fp32)
    progress: bool = True


@dataclass
class TeacherTrainingConfig:
    """Training a diffusers UNet2DModel on images (sid/teacher_training.py), EDM-style or by flow matching, in the
    vocabulary of the distillation config: the same sections where the ideas are the same."""

    data: TeacherDataConfig = field(default_factory=TeacherDataConfig)
    # diffusers UNet2DModel arguments; the default (4.96M parameters, 9.9 MB in fp16) fits a 10 MB asset
    unet: dict[str, Any] = field(default_factory=lambda: {
        "sample_size": 32, "in_channels": 1, "out_channels": 1, "layers_per_block": 2, "norm_num_groups": 8,
        "block_out_channels": [56, 112, 112], "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "dropout": 0.1})
    loss: TeacherLossConfig = field(default_factory=TeacherLossConfig)
    optim: TeacherOptimConfig = field(default_factory=TeacherOptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TeacherRunConfig = field(default_factory=TeacherRunConfig)
    on_cpu: dict[str, Any] = field(default_factory=dict)  # as in Config: applied only when no GPU is visible


# Keys that are gone, each with what to do instead (one line when a file or the command line names one).
REMOVED = {Config: {
    "train.tensorboard": "the tracker is now chosen by train.tracker: auto (TensorBoard when installed), none, "
                         "or one of " + ", ".join(TRACKERS),
    "teacher.edm_pickle.trust": "permission to run a file's code comes from the command line, never from a file: "
                                "pass --trust-code (trust_code=True in Python)"}}
# Keys of the teacher config before it shared the distillation config's sections: each names its new place.
MOVED = {TeacherTrainingConfig: {
    "source": "data.source", "xflip": "data.xflip", "objective": "loss.objective", "sigma_data": "loss.sigma_data",
    "p_mean": "loss.p_mean", "p_std": "loss.p_std", "batch": "optim.batch", "lr": "optim.lr",
    "warmup_nimg": "optim.warmup_nimg", "ema_halflife_nimg": "ema.halflife_nimg", "ema_rampup": "ema.rampup",
    **{key: f"train.{key}" for key in ("total_nimg", "seed", "precision", "run_dir", "log_every_nimg",
                                       "sample_every_nimg", "ckpt_every_nimg", "keep_ckpts", "export_fp16",
                                       "progress")}}}
TEACHER_CHOICES = {"loss.objective": ("edm", "flow"), "train.precision": ("auto", "fp32", "bf16")}
TEACHER_POSITIVE = ("optim.batch", "optim.lr", "train.total_nimg", "train.log_every_nimg", "train.sample_every_nimg",
                    "train.ckpt_every_nimg", "train.keep_ckpts", "loss.sigma_data", "loss.p_std")


def check_choices(cfg: DictConfig, choices: dict, positive=()) -> None:
    """Each key's value among its choices, and each of ``positive`` > 0: else one line naming the key."""
    for key, allowed in choices.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise SidError(f"{key}={OmegaConf.select(cfg, key)!r} is invalid; choose one of {allowed}")
    for key in positive:
        if not OmegaConf.select(cfg, key) > 0:
            raise SidError(f"{key}={OmegaConf.select(cfg, key)!r} must be positive")


def validate_teacher_training(cfg: DictConfig) -> None:
    check_choices(cfg, TEACHER_CHOICES, TEACHER_POSITIVE)
    for key, value in _numbers(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(value, float) and not math.isfinite(value):
            raise SidError(f"{key}={value} must be a finite number")
    for key, test, valid in (("optim.warmup_nimg", lambda v: v >= 0, ">= 0"), ("ema.halflife_nimg", lambda v: v >= 0,
                             ">= 0 (0: no EMA)"), ("ema.rampup", lambda v: v >= 0, ">= 0"),
                             ("train.seed", lambda v: 0 <= v < 2**63, "in [0, 2^63)")):
        if not test(OmegaConf.select(cfg, key)):
            raise SidError(f"{key}={OmegaConf.select(cfg, key)!r} is out of range: it must be {valid}")


def validate(cfg: DictConfig) -> None:
    """Reject values the schema's types cannot: choices, ranges, and the λ spelling."""
    check_choices(cfg, CHOICES)
    lam = resolve_lam(cfg.loss.lam)
    if not math.isfinite(lam):
        raise SidError(f"loss.lam={cfg.loss.lam} must be a finite number")
    check_ranges(cfg)
    if cfg.eval.every_nimg and cfg.teacher.kind != "analytic" and not cfg.eval.fid_ref:
        raise SidError("eval.every_nimg needs eval.fid_ref (reference statistics from `sid fid ref`)")
    if cfg.teacher.kind == "diffusers" and not (cfg.teacher.diffusers.path or cfg.teacher.diffusers.unet_config):
        raise SidError("teacher.kind=diffusers needs teacher.diffusers.path (a local folder or hub id)")
    if cfg.teacher.kind == "edm_pickle" and not cfg.teacher.edm_pickle.path:
        raise SidError("teacher.kind=edm_pickle needs teacher.edm_pickle.path (an EDM .pkl file or URL)")
    if cfg.teacher.kind == "python" and not (cfg.teacher.python.factory and cfg.teacher.python.shape):
        raise SidError("teacher.kind=python needs teacher.python.factory (package.module:function) and "
                       "teacher.python.shape (one sample's shape, e.g. [3, 32, 32])")
    if (cfg.lora.fake_score or cfg.lora.generator) and cfg.teacher.kind == "analytic":
        raise SidError("lora.fake_score and lora.generator adapt a network teacher's weights; an analytic teacher's "
                       "students are MLPs fitted to it: leave them false")


def presets_folder() -> Path:
    """The shipped presets: the package ``sid.configs`` when installed (from a wheel; an editable install maps it
    to the clone's ``configs/``), else the ``configs/`` beside ``sid/`` in a clone used without installing."""
    try:
        return Path(str(importlib.resources.files("sid.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


PRESETS = presets_folder()


def preset_names() -> list[str]:
    """The shipped presets, by the names ``--config`` takes: ``fmnist``, ``teacher/fmnist``, ..."""
    return sorted(p.relative_to(PRESETS).with_suffix("").as_posix() for p in PRESETS.rglob("*.yaml"))


def find_config(name) -> Path:
    """A YAML file's path, or a shipped preset's name (``fmnist`` is ``configs/fmnist.yaml``)."""
    path = Path(name)
    if _is_file(path):
        return path
    preset = PRESETS / (str(path) if path.suffix == ".yaml" else f"{path}.yaml")
    if not path.is_absolute() and ".." not in path.parts and _is_file(preset):     # a name, not a path
        return preset
    shown = str(name) if len(str(name)) <= 200 else str(name)[:200] + "..."
    raise SidError(f"config {shown}: no such file, and no shipped preset of that name ({', '.join(preset_names())})")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:                      # a name too long for the file system, say
        return False


MAX_YAML_BYTES, MAX_YAML_VALUES = 1 << 20, 100_000


def read_yaml(path: Path) -> DictConfig:
    """A config file as a mapping; anything else (a YAML error, tabs, duplicate keys, tags, a binary file, aliases
    that expand beyond reason, a list at the top) is one line naming the file."""
    import io

    import yaml

    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ValueError(f"it is larger than {MAX_YAML_BYTES >> 20} MB; a config is a few lines")
        text = path.read_bytes().decode("utf-8")
        if _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader)) > MAX_YAML_VALUES:
            raise ValueError(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
        node = OmegaConf.load(io.StringIO(text))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        if isinstance(e, yaml.MarkedYAMLError) and e.problem:       # what is wrong, and where
            mark = e.problem_mark
            reason = f"{e.problem}" + (f", line {mark.line + 1} column {mark.column + 1}" if mark else "")
        raise SidError(f"config {path} is not a readable YAML file ({type(e).__name__}: {reason})") from None
    if not isinstance(node, DictConfig):
        raise SidError(f"config {path} holds a {type(node).__name__.replace('Config', '').lower() or 'value'}, not "
                       "a mapping of settings (key: value)")
    return node


def _expanded_size(node, limit: int = MAX_YAML_VALUES) -> int:
    """How many nodes a YAML node graph holds with every alias expanded, counting no further than ``limit``."""
    count, stack = 0, [node]
    while stack and count <= limit:
        current = stack.pop()
        count += 1
        if current is None:
            continue
        value = current.value
        if isinstance(value, list):
            stack.extend(v for pair in value for v in (pair if isinstance(pair, tuple) else (pair,)))
    return count


def load_config(files=(), overrides=(), schema_class=None) -> DictConfig:
    """Schema defaults, then each YAML file or preset (``find_config``), then (no GPU visible) the ``on_cpu``
    settings, then ``key=value`` overrides; validated and read-only.

    ``schema_class`` defaults to the distillation ``Config``; ``TeacherTrainingConfig`` is the other schema.
    """
    schema_class = schema_class or Config
    schema = OmegaConf.structured(schema_class)
    moved, removed = MOVED.get(schema_class, {}), REMOVED.get(schema_class, {})
    cfg = schema
    for path in map(find_config, files):
        try:
            cfg = OmegaConf.merge(cfg, read_yaml(path))
        except OmegaConfBaseException as e:
            raise _friendly(e, schema, str(path), moved, removed) from None
    try:
        command_line = OmegaConf.from_dotlist(list(overrides))
        cfg = OmegaConf.merge(cfg, command_line)
    except OmegaConfBaseException as e:
        raise _friendly(e, schema, "the command line", moved, removed) from None
    if cfg.on_cpu:
        try:
            on_cpu = OmegaConf.merge(cfg, cfg.on_cpu, command_line)      # checked on every machine
        except OmegaConfBaseException as e:
            raise _friendly(e, schema, "on_cpu", moved, removed) from None
        if not gpu_visible():
            cfg = on_cpu
    try:                                 # every ${...} now, not at the first save an interval later
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        raise SidError(f"config key {key!r} cannot be resolved ({str(e).splitlines()[0][:160]}): give it a value") \
            from None
    (validate if schema_class is Config else validate_teacher_training)(cfg)
    OmegaConf.set_readonly(cfg, True)  # after merging: read-only nodes do not merge (omegaconf#1102)
    return cfg


def gpu_visible() -> bool:
    import torch  # late: --dry-run and config errors stay fast

    return torch.cuda.is_available()


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def plain(node):
    """A config node as plain Python (dicts, lists, scalars); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def as_tuple(node) -> tuple:
    return tuple(node) if isinstance(node, (ListConfig, list, tuple)) else (node,)
