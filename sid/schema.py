"""The configuration's schemas: ``Config`` (``sid train``) and ``TeacherTrainingConfig`` (``sid teacher``), typed
dataclasses with every default and a comment on each key, in one vocabulary (the same sections where the ideas are
the same). ``sid/config.py`` reads, merges and validates configs against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


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
    max_sequence_length: Optional[int] = None  # families with T5 or Gemma: the prompt's tokens it encodes (SiD-DiT:
                                         # SD3 at 77); null: the pipeline's own (SD3 256, FLUX 512, PixArt-α 120,
                                         # PixArt-Σ and Sana 300)


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
    sigma_init: float = 2.5              # G(z) = D_θ(sigma_init z, sigma_init); inf: pure noise, a flow teacher's
                                         # t = 1 (SiD-DiT), D = z − v(z; 1)
    t_init: Optional[int] = None         # discrete teachers: sigma_init = σ of this timestep (SiD-LSG: 625 = σ 2.5017)
    steps: int = 1                       # K: SiD-DiT's few-step generator on t_i = t_init (1 − i/K) (sid/steps.py)
    renoise: str = "fresh"               # between steps: fresh | fixed | ddim noise (SiD-DiT's noise_type)
    random_steps: bool = False           # train on k ~ U{1..K} steps each iteration, the k-th trained (SiD-DiT)
    init: Optional[str] = None           # start the generator and its EMA from this exported generator (a run
                                         # folder or its generator/), e.g. SiD²A from a SiD run; null: the teacher


@dataclass
class LossConfig:
    kind: str = "sid"                    # the member of the identity family: sid (SiD and FGM, by λ) | dmd (DMD /
                                         # VSD: both networks' outputs detached, the gradient ω (f_ψ − f_φ)) |
                                         # sida (SiD + a GAN term whose logit is the fake score's encoder; reads
                                         # real images, data.source) | sim (SIM: the pseudo-Huber score
                                         # divergence of loss.sim_c)
    lam: str = "sid"                     # λ: sid (1.2) | lambda1 (1.0) | fgm (0.5) | l2 (0) | any number (kind sid)
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
    sim_c: float = 1.0                   # SIM's c: d(y) = √(‖y‖² + c²) − c on the score difference y (score units,
                                         # 1/σ times the noise's); c → ∞ is SiD at λ = 1
    # SiDA (kind sida; Zhou et al. 2025): generator ½ g_scale ℓ_SiD + ½ gan_scale ω BCE(D_ψ(x_t), 1)·CHW; fake
    # score its denoising loss + d_scale λ_EDM(σ) ½ [BCE(D_ψ(x_real + σn), 1) + BCE(D_ψ(x_g + σn), 0)]
    gan_scale: float = 0.01              # c_GAN, the generator's adversarial term
    d_scale: float = 1.0                 # c_D, the fake score's (discriminator's) term
    gan_start_nimg: int = 200_000        # the generator's adversarial term from this many images on
    g_start_nimg: int = 100_000          # generator updates from this many images on (the fake score first)


@dataclass
class ConditionsConfig:
    """What the generator is asked for, data-free (sid/conditions.py)."""

    prompts: Optional[str] = None        # text-to-image teachers: a text file (one prompt per line), .jsonl,
                                         # .parquet or WebDataset .tar shards (a glob), read on demand (any
                                         # size); shuffled anew each pass, resumable
    prompt_key: Optional[str] = None     # the prompt's JSONL field or Parquet column (null: prompt, text or
                                         # caption), or the shards' caption extension (null: txt)
    cache: Optional[str] = None          # text-to-image: every prompt's embedding, encoded once into this
                                         # .safetensors file (made when missing; small prompt sets)
    class_probs: list[float] = field(default_factory=list)  # class-conditional teachers: each class's
                                         # probability (normalised); empty: uniform


@dataclass
class DataConfig:
    """Real images, read only by the members that use them (loss.kind=sida; sid/real_images.py)."""

    source: Optional[str] = None         # fashion-mnist[:train|:test] | .npz (images, labels) | image folder
                                         # (labels: dataset.json or sub-folders) | WebDataset .tar shards (a
                                         # glob; labels: .cls); resized and cropped to the teacher's images;
                                         # teacher: an analytic teacher's exact samples; null: data-free
    xflip: bool = False                  # random horizontal flips
    skip_bad: bool = False               # skip unreadable images with a warning (false: one error line)
    cache: Optional[str] = None          # latent teachers: every image's latents, encoded once into this
                                         # .safetensors file (made when missing; small image sets)


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
    fake_updates: int = 1                # fake-score updates per generator update (DMD2's two time-scale rule: 5)
    fake_clip: Optional[float] = None    # clip the fake score's gradients to [−c, c] elementwise; null: the
                                         # member's own (sida: 1, as SiDA's code; others: none)


@dataclass
class EMAConfig:
    halflife_nimg: Any = 500_000         # EMA half-life in images (SiD: 0.5 Mimg); 0 disables. sid train: a list
                                         # keeps one EMA per half-life (the first is generator/, each is
                                         # exported as generator-ema-<h>/, the best of them generator-best/)
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
    data: DataConfig = field(default_factory=DataConfig)
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
RENOISE = ("fresh", "fixed", "ddim")      # generator.renoise: how a few-step generator re-noises (sid/steps.py)
MAX_STEPS = 64                            # generator.steps at most
TEACHER_KINDS = tuple(f.name for f in fields(TeacherConfig) if f.name != "kind")


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
