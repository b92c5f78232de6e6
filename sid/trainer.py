"""Data-free distillation: the builders, one training iteration, and the loop around it.

One iteration (SiD, Zhou et al. 2024, Algorithm 1) updates the fake score on the generator's samples, then the
generator through the frozen teacher and fake score, then the generator's EMA. The module is the only one that
knows Accelerate for distillation. Precision policy, stated once: trainable networks keep fp32 master weights;
with ``train.precision=bf16`` every network forward runs under one bf16 autocast, while the coefficient rules,
the losses and the optimisers stay in fp32.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from PIL import Image

from sid.checkpoint import (
    Owned,
    all_finite,
    check_fresh_start,
    claimed,
    load_training_state,
    resolve_resume,
    restore,
    save_training_state,
    write_config,
)
from sid.conditions import Prompts, build_conditions, read_prompts
from sid.config import LAMBDA_PRESETS, as_tuple, to_dict, to_yaml
from sid.ema import EMA, ema_beta
from sid.errors import SidError
from sid.generator import OneStepGenerator, export_generator, note_measured, num_params
from sid.generator import push_to_hub as upload  # the trainer's argument takes the name
from sid.images import image_grid, save_image_grid, save_panels, save_samples
from sid.lora import is_lora, lora_student, merged, save_adapter, shares
from sid.losses import DistillationLoss
from sid.metrics import (
    generator_fid,
    load_reference,
    make_clip,
    make_fid,
    prompt_fid,
    sliced_wasserstein,
    text_sampler,
)
from sid.runtime import (
    GracefulStop,
    MetricsLogger,
    NonFiniteGuard,
    TrainingInterrupted,
    any_process,
    best_record,
    check_launch,
    crossed,
    keep_finite,
    micro_batches,
    out_of_memory_advice,
    past,
    precision_policy,
    sanitize_grads,
    step_seed,
)
from sid.sampling import sample_teacher
from sid.sharding import check_launch as check_sharding
from sid.sharding import device_mesh, full_state, loaded, meta_copy, shard, split_optimizer_state
from sid.teachers import Teacher, build_teacher

__all__ = ["Run", "TrainingInterrupted", "build", "iteration", "train"]


@dataclass
class Run:
    """Everything the loop touches, built before it starts."""

    cfg: object                          # the resolved, read-only config
    accelerator: Accelerator
    teacher: Teacher
    conditions: object                   # the data-free conditions source (sid/conditions.py)
    loss: DistillationLoss
    fake_score: torch.nn.Module          # f_ψ (unwrapped)
    generator: OneStepGenerator          # G_θ (unwrapped)
    fake_ddp: torch.nn.Module            # the same modules as prepared by Accelerate (DDP on several processes)
    generator_ddp: torch.nn.Module
    opt_fake: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    ema: EMA
    batch_gpu: int                       # per-process micro-batch
    rounds: int                          # micro-batches per update (gradient accumulation)
    shared: frozenset = frozenset()      # ids of the teacher's tensors (LoRA students share them, frozen)
    template: torch.nn.Module | None = None  # sharded runs: the generator's architecture (meta), to gather into
    nimg: int = 0
    step: int = 0                        # iterations done
    seconds: float = 0.0                 # wall-clock seconds of the sessions before this one (resumed runs)
    bf16: bool = False
    precision: str = ""                  # where the precision came from (the config, or Accelerate's launch)
    resumed: dict | None = None          # the restored state's logger and NaN-guard sums (resumed runs)
    changed: list[str] | None = None     # optimiser settings the config changed on resume

    @property
    def sharded(self) -> bool:
        return self.template is not None

    def autocast(self):
        """The one mixed-precision policy: network forwards in bf16 under autocast, everything else fp32.

        Stated here rather than through Accelerate's ``mixed_precision``, which is fixed once per process and
        autocasts only the prepared modules; a launch with ``--mixed_precision bf16`` selects this same policy
        (``runtime.precision_policy``).
        """
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.bf16)


# Builders --------------------------------------------------------------------------------------------------------

def use_compile(compile: bool | None, device: torch.device) -> bool:
    """``perf.compile``: null compiles on GPUs, where the speed repays the compile time, and not on CPUs."""
    return device.type == "cuda" if compile is None else compile


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa) for fp32 matmuls and convolutions on CUDA; process-wide."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def apply_perf(perf, bf16: bool, teacher: Teacher, students: list[torch.nn.Module]) -> None:
    """The ``perf`` switches that change how networks are stored; before optimisers and EMA are built."""
    networks = (teacher.denoiser, *students)
    if perf.grad_checkpointing:
        for net in networks:
            teacher.checkpoint_activations(net)
    if perf.channels_last:
        for net in networks:
            net.to(memory_format=torch.channels_last)
    if bf16 and perf.teacher_bf16:
        teacher.store_frozen(torch.bfloat16)


def build(cfg, accelerator: Accelerator, resume: str | None, trust_code: bool = False) -> Run:
    """Teacher, students, loss, optimisers and EMA, restored from a checkpoint when resuming."""
    device = accelerator.device
    bf16, precision = precision_policy(cfg.train.precision, accelerator)
    if device.type == "cuda":
        set_tf32(cfg.perf.tf32)
    torch.manual_seed(cfg.train.seed)          # identical networks on every process (also a random-init teacher)
    teacher = build_teacher(cfg.teacher, trust_code=trust_code)
    if cfg.perf.offload_codec:                  # before the move: the VAE and text encoder stay on the CPU
        teacher.offload_codec(device)
    sharding = sharding_of(accelerator)
    if sharding is not None:
        check_sharding(accelerator.num_processes, cfg.lora.fake_score or cfg.lora.generator)
    teacher.to(device, denoiser=sharding is None)   # sharded: each process's shard reaches the device when split
    conditions = build_conditions(cfg, teacher, accelerator.process_index, accelerator.num_processes)
    shared = frozenset(shares(teacher.denoiser))
    fake_score = student(teacher, cfg.lora, cfg.lora.fake_score)
    generator = OneStepGenerator(student(teacher, cfg.lora, cfg.lora.generator), teacher.shape,
                                 initial_sigma(cfg.generator, teacher))
    apply_perf(cfg.perf, bf16, teacher, [fake_score, generator])
    batch_gpu, rounds = micro_batches(cfg, accelerator.num_processes)
    loss = DistillationLoss.from_config(cfg.loss, teacher, per_process=batch_gpu * rounds)

    def adam(module, lr, betas):
        return torch.optim.Adam(own_parameters(module, shared), lr=lr, betas=tuple(betas), eps=cfg.optim.eps,
                                fused=cfg.perf.fused_adam or None)

    ema = EMA(generator, cfg.ema.halflife_nimg, cfg.ema.rampup, shared)
    nimg = step = 0
    seconds, resumed, changed = 0.0, None, []
    path = resolve_resume(resume, cfg.train.run_dir) if resume else None
    if path is not None:                        # the networks whole, before any sharding splits them
        state = load_training_state(path)
        restore(path, state, fake_score=Owned(fake_score, shared), generator=Owned(generator, shared),
                ema=Owned(ema.model, shared))
    template = None
    if sharding is None:
        ema.to(device)
    else:                                       # FSDP2: every network split over the processes, block by block
        template = meta_copy(generator)
        mesh = device_mesh(device, accelerator.num_processes)
        offload = device.type != "cpu" and type(sharding.cpu_offload).__name__ == "CPUOffloadPolicy"
        shard(teacher.denoiser, mesh, sharding.reshard_after_forward, offload=offload)
        for net in (fake_score, generator, ema.model):
            shard(net, mesh, sharding.reshard_after_forward)
    opt_fake = adam(fake_score, cfg.optim.fake_lr, cfg.optim.fake_betas)
    opt_g = adam(generator, cfg.optim.g_lr, cfg.optim.g_betas)
    if path is not None:
        restore(path, state, convert=split_optimizer_state if sharding else None, opt_fake=opt_fake, opt_g=opt_g)
        nimg, step, seconds = state["nimg"], state["step"], state.get("seconds", 0.0)
        conditions.load_state_dict(state.get("conditions"))
        resumed = {k: state[k] for k in ("metrics", "nonfinite") if k in state}
        # The config's optimiser settings hold, not the checkpoint's (a lower learning rate on resume takes effect).
        changed = (apply_hyperparameters(opt_fake, "optim.fake", cfg.optim.fake_lr, cfg.optim.fake_betas, cfg.optim.eps)
                   + apply_hyperparameters(opt_g, "optim.g", cfg.optim.g_lr, cfg.optim.g_betas, cfg.optim.eps))
        accelerator.print(f"resumed from {path} at {nimg} images")
    if use_compile(cfg.perf.compile, device):   # in place: state_dict keys and the EMA copy stay uncompiled
        accelerator.print("torch.compile: the networks compile during the first iterations (perf.compile=false: eager)")
        for net in (teacher.denoiser, fake_score, generator):
            net.compile()
    if sharding is None:                        # DDP on several processes; sharded networks synchronise themselves
        fake_ddp, generator_ddp, opt_fake, opt_g = accelerator.prepare(fake_score, generator, opt_fake, opt_g)
    else:
        fake_ddp, generator_ddp = fake_score, generator
    return Run(cfg, accelerator, teacher, conditions, loss, fake_score, generator, fake_ddp, generator_ddp, opt_fake,
               opt_g, ema, batch_gpu, rounds, shared, template, nimg, step, seconds, bf16=bf16, precision=precision,
               resumed=resumed, changed=changed)


def sharding_of(accelerator: Accelerator):
    """Accelerate's FSDP plugin when the launch asks for sharding (``accelerate launch --use_fsdp``, or an
    accelerate config file's ``distributed_type: FSDP``), else None. Its settings are read (``fsdp_version`` 2,
    ``reshard_after_forward``, ``cpu_offload`` for the frozen teacher's shards); sid shards the networks itself
    (``sid.sharding``), since Accelerate's wrapper prepares one trained model with its optimiser, where SiD has a
    frozen teacher, two students and an EMA. On CPUs Accelerate launches gloo processes without sharding them:
    the launcher's ``ACCELERATE_USE_FSDP`` is read then."""
    import os

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if accelerator.distributed_type != DistributedType.FSDP and not launched:
        return None
    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise SidError(f"accelerate's FSDP version {plugin.fsdp_version}: sid shards with FSDP2; launch with "
                       "--fsdp_version 2 (or fsdp_version: 2 in the accelerate config file)")
    return plugin


def student(teacher: Teacher, lora, adapters: bool) -> torch.nn.Module:
    """A trainable denoiser that starts as the teacher: LoRA adapters over its weights (``lora.fake_score``,
    ``lora.generator``), or the family's own student (a copy)."""
    return lora_student(teacher, lora) if adapters else teacher.make_student()


def own_parameters(module: torch.nn.Module, shared: frozenset) -> list[torch.nn.Parameter]:
    """The parameters a student trains: all of a copy's; a LoRA student's adapters (not the teacher's weights)."""
    return [p for p in module.parameters() if id(p) not in shared]


def set_training(module: torch.nn.Module, on: bool, shared: frozenset) -> None:
    """Train mode and gradients of a student's own parameters on (its update) or off (frozen in the other's)."""
    module.train(on)
    for p in own_parameters(module, shared):
        p.requires_grad_(on)


def initial_sigma(section, teacher: Teacher) -> float:
    """The generator's σ_init: ``generator.sigma_init``, or the σ of the teacher's timestep ``generator.t_init``
    (SiD-LSG's 625: the VP image of σ_init = 2.5)."""
    if section.t_init is None:
        return float(section.sigma_init)
    sigmas = teacher.timestep_sigmas()
    if sigmas is None or section.t_init >= len(sigmas):
        what = "has continuous time" if sigmas is None else f"has timesteps 0..{len(sigmas) - 1}"
        raise SidError(f"generator.t_init={section.t_init}: this {teacher.spec['kind']} teacher {what}; set "
                       "generator.t_init=null and give generator.sigma_init")
    return float(sigmas[section.t_init])


def apply_hyperparameters(optimizer: torch.optim.Optimizer, name: str, lr: float, betas, eps: float) -> list[str]:
    """Set a restored optimiser's learning rate, betas and eps to the config's; returns what changed."""
    changed = []
    for group in optimizer.param_groups:
        for key, value in (("lr", float(lr)), ("betas", tuple(float(b) for b in betas)), ("eps", float(eps))):
            if group[key] != value:
                label = f"{name}_{key}" if key != "eps" else "optim.eps"
                changed.append(f"{label} {group[key]} -> {value}")
                group[key] = value
    return sorted(set(changed))


def describe(run: Run) -> str:
    """One line on what is about to run: teacher, loss, batch, machine, budget, folder."""
    cfg, acc, params = run.cfg, run.accelerator, num_params(run.teacher.denoiser)
    size = f"{params / 1e6:.2f}M parameters, " if params else ""
    named = f" ({cfg.loss.lam})" if str(cfg.loss.lam) in LAMBDA_PRESETS else ""
    processes = (f"{acc.num_processes} {acc.device.type} process{'es' if acc.num_processes > 1 else ''}"
                 f"{', sharded (FSDP2)' if run.sharded else ''}")
    budget = f"{cfg.train.total_nimg:,} images" + (f" or {cfg.train.max_seconds:g} s" if cfg.train.max_seconds else "")
    source = ""
    if isinstance(run.conditions, Prompts):
        cached = " (embeddings cached)" if run.conditions.cache is not None else ""
        source = f" from {len(run.conditions.prompts):,} prompts{cached}"
    return (f"distilling the {cfg.teacher.kind} teacher ({size}samples {'×'.join(map(str, run.teacher.shape))}) "
            f"into a one-step generator{source}: "
            f"λ = {run.loss.lam:g}{named}, weighting {cfg.loss.weighting}{native(run.loss)}, "
            f"{adapters(run)}batch {cfg.optim.batch} on {processes}, "
            f"{'bf16 autocast' if run.bf16 else 'fp32'} ({run.precision})"
            f"{', compiled' if use_compile(cfg.perf.compile, acc.device) else ''}; "
            f"{f'from {run.nimg:,} ' if run.nimg else ''}to {budget}, in {cfg.train.run_dir}"
            f"{'; from the config, not the checkpoint: ' + ', '.join(run.changed) if run.changed else ''}")


def adapters(run: Run) -> str:
    """The LoRA students, for ``describe``: which, their rank and trained parameters."""
    lora = [name for name, on in (("fake score", run.cfg.lora.fake_score), ("generator", run.cfg.lora.generator)) if on]
    if not lora:
        return ""
    trained = sum(p.numel() for p in own_parameters(run.generator if run.cfg.lora.generator else run.fake_score,
                                                          run.shared))
    return f"{' and '.join(lora)} as rank-{run.cfg.lora.rank} LoRA adapters ({trained:,} parameters each), "


def native(loss: DistillationLoss) -> str:
    """What of the loss differs from SiD's defaults, for ``describe``: time, fake loss, guidance."""
    parts = []
    if loss.time == "timesteps":
        parts.append(f"timesteps {loss.timesteps[0]}..{loss.timesteps[1]}")
    elif loss.time != "karras":
        parts.append(f"{loss.time} time")
    if loss.fake_weight is not None:
        parts.append("the teacher's own fake-score loss")
    scales = (loss.guide_fake_train, loss.guide_fake, loss.guide_teacher)
    if any(k != 1 for k in scales):
        parts.append("guidance κ1 {:g}, κ2 = κ3 {:g}, κ4 {:g}".format(*scales))
    return "".join(f", {p}" for p in parts)


# One iteration ---------------------------------------------------------------------------------------------------

class Update(NamedTuple):
    """What one optimiser update of a network leaves: device tensors only."""

    loss: torch.Tensor                   # the summed per-sample losses of the process's micro-batches
    dropped: torch.Tensor                # samples whose loss was not finite
    bad: torch.Tensor                    # whether any gradient was not finite
    samples: list                        # the (x_g detached, labels) of each micro-batch


class Stats(NamedTuple):
    loss_fake: torch.Tensor
    loss_g: torch.Tensor
    dropped: torch.Tensor
    bad: torch.Tensor                    # a non-finite loss or gradient somewhere in the iteration


def iteration(run: Run) -> Stats:
    """One training iteration, returning device tensors; it never syncs with the host, so the loop and the speed
    benchmark (eval/bench_speed.py) time the same code. Every iteration reseeds from (seed, rank, step)."""
    torch.manual_seed(step_seed(run.cfg.train.seed, run.accelerator.process_index, run.step))
    reuse = run.cfg.loss.reuse_generator_batch
    fake_updates = []

    # Update fake score: f_ψ fits fresh samples of the current generator, drawn with G in eval mode. With
    # loss.reuse_generator_batch only the first iteration does; later ones fit the generator step's samples.
    if not reuse or run.step == 0:
        run.generator.eval()
        set_training(run.fake_score, True, run.shared)
        fake_updates.append(update(run, run.fake_score, run.fake_ddp, run.opt_fake,
                                   partial(fake_score_micro_loss, run, None)))

    # Update generator: f_φ and f_ψ frozen in their parameters, differentiable in their inputs.
    set_training(run.fake_score, False, run.shared)
    run.generator.train()
    g = update(run, run.generator, run.generator_ddp, run.opt_g, partial(generator_micro_loss, run))

    if reuse:                            # f_ψ fits the samples of the generator step just taken (detached)
        run.generator.eval()
        set_training(run.fake_score, True, run.shared)
        fake_updates.append(update(run, run.fake_score, run.fake_ddp, run.opt_fake,
                                   partial(fake_score_micro_loss, run, g.samples)))

    # Update EMA, its ramp-up counting the images before this iteration's (as SiD's and EDM's loops).
    run.ema.update(run.generator, run.nimg, run.cfg.optim.batch)
    run.nimg += run.cfg.optim.batch
    run.step += 1

    dropped = sum((u.dropped for u in fake_updates), g.dropped)
    bad = g.bad                          # non-finite gradients; a dropped sample alone is not a non-finite step
    for u in fake_updates:
        bad = bad | u.bad
    return Stats(fake_updates[-1].loss, g.loss, dropped, bad)


def draw_inputs(run: Run) -> tuple[torch.Tensor, object]:
    """A micro-batch of generator inputs: z ~ N(0, I) and conditions from the run's source."""
    device = run.accelerator.device
    z = torch.randn(run.batch_gpu, *run.generator.shape, device=device)
    return z, run.conditions.draw(run.batch_gpu, device)


def fake_score_micro_loss(run: Run, samples: list | None, r: int) -> tuple[torch.Tensor, tuple]:
    """Micro-batch ``r`` of the fake-score loss: on ``samples[r]``, or (None) on fresh generator samples. With
    guidance on the fake score, a share of the conditions becomes the null one before the samples are drawn, as
    SiD-LSG drops prompts (on reused samples, only the fake score's conditions are replaced)."""
    if samples is None:
        z, labels = draw_inputs(run)
        labels = run.loss.fake_conditions(labels)
        with torch.no_grad():
            x_g = run.generator(z, labels)
    else:
        x_g, labels = samples[r]
        labels = run.loss.fake_conditions(labels)
    return run.loss.fake_score(run.fake_ddp, x_g, labels), (x_g, labels)


def generator_micro_loss(run: Run, r: int) -> tuple[torch.Tensor, tuple]:
    """Micro-batch ``r`` of the generator loss, through the frozen teacher and fake score."""
    z, labels = draw_inputs(run)
    x_g = run.generator_ddp(z, labels)
    return run.loss.generator(run.teacher.denoiser, run.fake_score, x_g, labels), (x_g.detach(), labels)


def update(run: Run, module: torch.nn.Module, ddp: torch.nn.Module, optimizer: torch.optim.Optimizer,
           micro_loss: Callable[[int], tuple[torch.Tensor, tuple]]) -> Update:
    """One optimiser step of ``module``: gradients accumulated over the micro-batches (all-reduced on the last
    one only), non-finite samples dropped and gradients sanitised (SiD's NaN policy), the step, cleared grads."""
    total, dropped, samples = 0.0, 0, []
    for r in range(run.rounds):
        sync = contextlib.nullcontext() if r == run.rounds - 1 else run.accelerator.no_sync(ddp)
        with sync, run.autocast():
            per_sample, sample = micro_loss(r)
            per_sample, n_bad = keep_finite(per_sample)
            run.accelerator.backward(per_sample.sum())
        total, dropped = total + per_sample.detach().sum(), dropped + n_bad
        samples.append(sample)
    bad = sanitize_grads(module)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return Update(total, dropped, bad, samples)


# The loop --------------------------------------------------------------------------------------------------------

def train(cfg, resume: str | None = None, trust_code: bool = False, push_to_hub: str | None = None) -> Run:
    """Distil ``cfg.teacher`` into a one-step generator; returns the finished run (for tests and notebooks).

    ``trust_code``: let the teacher's adapter run foreign code (an EDM pickle, a factory function);
    ``push_to_hub``: a Hub repository id the finished run's generator is uploaded to (``push_to_hub``)."""
    run_dir = Path(cfg.train.run_dir)
    check_fresh_start(run_dir, resume)
    tracker, note = choose_tracker(cfg.train.tracker)
    accelerator = Accelerator(log_with=tracker, project_dir=str(run_dir))
    warning = check_launch(accelerator)
    for line in (note, warning):
        if line:
            accelerator.print(line, file=sys.stderr)
    with claimed(run_dir, accelerator.is_main_process):
        run = run_training(cfg, accelerator, resume, trust_code)
    if push_to_hub and accelerator.is_main_process:
        url = upload(run_dir / "generator", push_to_hub, trust_code=trust_code)
        accelerator.print(f"pushed {run_dir / 'generator'} to {url}")
    return run


def run_training(cfg, accelerator: Accelerator, resume: str | None, trust_code: bool) -> Run:
    """``train`` in a claimed run folder: build (and restore), record the config, loop, report."""
    run_dir = Path(cfg.train.run_dir)
    if cfg.on_cpu and accelerator.device.type == "cpu":
        applied = " ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in flat(to_dict(cfg.on_cpu)))
        accelerator.print(f"no GPU visible: on_cpu settings applied ({applied})")
    run = build(cfg, accelerator, resume, trust_code)
    if accelerator.is_main_process:              # only once build and restore succeeded
        write_config(run_dir, to_yaml(cfg), run.nimg)
    accelerator.print(describe(run))
    start_tracker(run)
    start = time.time()
    advice = (f"at optim.batch_gpu={run.batch_gpu} per process: set a smaller optim.batch_gpu (optim.batch stays, "
              "by gradient accumulation) or perf.grad_checkpointing=true")
    try:
        with GracefulStop() as stop, out_of_memory_advice(advice, run_dir):
            interrupted = loop(run, stop)
    except Exception as e:
        if use_compile(cfg.perf.compile, accelerator.device) and type(e).__module__.startswith("torch._dynamo"):
            cause = getattr(e, "inner_exception", None) or e.__cause__ or e     # a backend's own error, if any
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            raise SidError(f"torch.compile failed ({type(cause).__name__}: {first}); "
                           "set perf.compile=false to train without it") from None
        raise
    accelerator.end_training()
    if interrupted:
        raise TrainingInterrupted(f"interrupted at {run.nimg:,} images, checkpointed in {run_dir}")
    accelerator.print(f"stopped at {run.nimg:,} images after {time.time() - start:.0f} s; generator in "
                      f"{run_dir / 'generator'}, samples in {run_dir / 'samples'}")
    return run


# The trackers of Accelerate that take pictures, and the form each takes one in: a batch (NHWC), one image, a list.
PICTURE_FORMS = {"tensorboard": "batch", "aim": "image", "clearml": "image", "wandb": "list", "swanlab": "list"}
# Where "pip install" finds each tracker, where the name differs.
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


def choose_tracker(name: str) -> tuple[str | None, str | None]:
    """``train.tracker`` as Accelerate's ``log_with``, and a line to print: ``auto`` is TensorBoard where it is
    installed (else none, said once); a named tracker that is not installed is one error line (Accelerate would
    drop it without a word)."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    if name == "none":
        return None, None
    if name == "auto":
        if "tensorboard" in available:
            return "tensorboard", None
        return None, ("note: TensorBoard is not installed, so the metrics go to metrics.jsonl only (pip install "
                      "tensorboard, or train.tracker=none to say so)")
    if name not in available:
        raise SidError(f"train.tracker={name}, but {name} is not installed: pip install "
                       f"{TRACKER_PACKAGES.get(name, name)}, or choose another tracker (train.tracker=none: none)")
    return name, None


def start_tracker(run: Run) -> None:
    """The tracker's run: the whole config as its hyperparameters. TensorBoard's files go to ``tensorboard/`` in
    the run folder, and a resumed run hides the events past its checkpoint, as metrics.jsonl drops them; wandb's
    run is named after the run folder and keeps its files there."""
    acc, run_dir = run.accelerator, Path(run.cfg.train.run_dir)
    if not acc.log_with:
        return
    name = str(acc.log_with[0])
    kwargs = {"tensorboard": {"purge_step": run.nimg + 1} if run.nimg else {},
              "wandb": {"name": run_dir.name, "dir": str(run_dir)}}
    acc.init_trackers("tensorboard" if name == "tensorboard" else "sid", config=flat(to_dict(run.cfg)),
                      init_kwargs={name: kwargs[name]} if kwargs.get(name) else {})


def log_picture(run: Run, name: str, path: Path) -> None:
    """A picture written to the run folder also to the tracker, at the run's image count, in the form each of
    Accelerate's trackers takes (trackers without pictures are passed over)."""
    image = np.asarray(Image.open(path).convert("RGB"))
    for tracker in run.accelerator.trackers:
        form = PICTURE_FORMS.get(tracker.name)
        if form == "batch":
            tracker.log_images({name: image[None]}, step=run.nimg, dataformats="NHWC")
        elif form:
            tracker.log_images({name: image if form == "image" else [image]}, step=run.nimg)


def loop(run: Run, stop: GracefulStop) -> bool:
    """Train until ``train.total_nimg`` or ``train.max_seconds``; returns whether a signal stopped it (then the
    last step is checkpointed, with the metrics of its unfinished log interval, before its scheduled samples and
    evaluation)."""
    cfg, acc = run.cfg, run.accelerator
    logger = MetricsLogger(acc, cfg.train.run_dir, {"loss_fake": "mean", "loss_g": "mean", "dropped_samples": "sum",
                                                    "nonfinite_steps": "steps"},
                           run.nimg, run.seconds, total_nimg=cfg.train.total_nimg, time_budget=cfg.train.max_seconds,
                           tracker=bool(acc.trackers), progress=cfg.train.progress)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, acc.device, cfg.train.run_dir)
    if run.resumed:                               # an unfinished interval's sums: its record is the uninterrupted one
        logger.load_state_dict(run.resumed.get("metrics"))
        guard.load_state_dict(run.resumed.get("nonfinite"))
    evaluate = build_evaluator(run) if cfg.eval.every_nimg else None
    deadline = time.time() + cfg.train.max_seconds if cfg.train.max_seconds else None
    batch, done, stopped = cfg.optim.batch, run.nimg >= cfg.train.total_nimg, False

    while not done:
        stats = iteration(run)

        # Maintenance: metrics, samples, evaluation, checkpoints; host syncs happen only here.
        guard.update(stats.bad)
        logger.add(loss_fake=stats.loss_fake, loss_g=stats.loss_g, dropped_samples=stats.dropped,
                   nonfinite_steps=stats.bad)
        logger.tick(run.nimg)
        done = run.nimg >= cfg.train.total_nimg
        at_log = crossed(run.nimg, batch, cfg.train.log_every_nimg) or done
        stopped = stop.agreed(acc, at_log) and not done                  # on the last step: finish normally
        if at_log:
            guard.check(acc)
            beta = ema_beta(batch, run.nimg - batch, cfg.ema.halflife_nimg, cfg.ema.rampup)   # the last update's
            logger.flush(run.nimg, run.step, ema_beta=beta)
            done = done or (deadline is not None and past(deadline, acc))
        # Checkpoint first: pictures and evaluation that fail cannot lose the interval.
        if crossed(run.nimg, batch, cfg.train.ckpt_every_nimg) or done or stopped:
            guard.check(acc)
            with logger.doing("saving a checkpoint"):
                save_checkpoint(run, logger, guard)
        if crossed(run.nimg, batch, cfg.train.sample_every_nimg) or done:
            with logger.doing("drawing sample grids"):
                draw_samples(run)
        if evaluate and (crossed(run.nimg, batch, cfg.eval.every_nimg) or done):
            with logger.doing(f"measuring {'swd' if run.teacher.exact_samples else 'FID'} on {cfg.eval.num:,} samples"):
                logger.write({"nimg": run.nimg, "seconds": logger.elapsed(), **evaluate()})    # when it began
        if stopped:
            break
    logger.close()
    return stopped


# Maintenance -----------------------------------------------------------------------------------------------------

def build_evaluator(run: Run):
    """In-loop quality of the EMA generator on cfg.eval.num samples at fixed seeds, by the main process:
    proxy FID against reference statistics for image teachers, the sliced Wasserstein distance to exact
    samples for teachers that have them. Returns a function giving ``{"fid": v}`` or ``{"swd": v}``.

    Each value better than every earlier one of the run (lower; read back from metrics.jsonl when resuming)
    also exports the EMA generator to ``generator-best/``: SiD's results are the best snapshot of a run."""
    cfg, acc = run.cfg, run.accelerator
    if run.teacher.exact_samples:
        name, reference = "swd", run.teacher.sample(cfg.eval.num, torch.Generator().manual_seed(0))

        def measure(generator):
            x = generator.sample_seeds(range(cfg.eval.num), device=acc.device).cpu()
            return sliced_wasserstein(x, reference)
    elif run.teacher.text_to_image:                          # FID (and CLIP score) for prompts, decoded
        name, metric = "fid", make_fid(cfg.eval.fid_weights).to(acc.device) if acc.is_main_process else None
        clip = make_clip(cfg.eval.clip).to(acc.device) if cfg.eval.clip and acc.is_main_process else None
        prompts = read_prompts(cfg.eval.prompts) if cfg.eval.prompts else run.conditions.prompts
        if metric is not None:
            load_reference(metric, cfg.eval.fid_ref)

        def measure(generator):
            sample = text_sampler(generator, run.teacher, acc.device)
            return prompt_fid(metric, sample, prompts, cfg.eval.num, resolution=cfg.eval.resolution, clip=clip)
    else:
        name, metric = "fid", make_fid(cfg.eval.fid_weights).to(acc.device) if acc.is_main_process else None
        if metric is not None:
            load_reference(metric, cfg.eval.fid_ref)

        def measure(generator):
            return generator_fid(metric, generator, cfg.eval.num, decode=run.teacher.decode)

    best = best_record(Path(cfg.train.run_dir) / "metrics.jsonl", name)

    def evaluate():
        nonlocal best
        result = {}
        generator = ema_generator(run)                          # a sharded run's: gathered (every process)
        if acc.is_main_process:
            measured = measure(generator)
            result = measured if isinstance(measured, dict) else {name: measured}
        if result and result[name] < best:                      # NaN is never better
            best = result[name]
            export(run, "generator-best", generator, **result)
        if result:                                              # the export of this step, if any, names it too
            note_measured(Path(cfg.train.run_dir) / "generator", run.nimg, result)
        acc.wait_for_everyone()
        return result

    return evaluate


def draw_samples(run: Run) -> None:
    """``save_sample_grid``, where a failure (a teacher whose samples cannot be drawn) is one warning line: the
    checkpoint is already written, and training goes on."""
    try:
        save_sample_grid(run)
    except Exception as e:                                # pictures are never worth the run
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: no sample grid at {run.nimg:,} images ({type(e).__name__}: {first}); training goes on",
              file=sys.stderr, flush=True)


def save_sample_grid(run: Run) -> None:
    """EMA-generator samples at fixed seeds 0..N-1 next to the teacher's: for images, ``samples-N.png`` (the
    generator's grid) and ``compare.png`` (it beside ``teacher.png``, the teacher's Heun samples at the same
    seeds, 35 evaluations, under the loss's teacher guidance, drawn once); for 2-D points a scatter over the
    teacher's (exact, or Heun) samples. A text-to-image run draws the first N prompts (``prompts.txt``) and
    decodes its latents through the teacher's VAE."""
    acc = run.accelerator
    if not (acc.is_main_process or run.sharded):
        return
    cfg, teacher, device = run.cfg, run.teacher, acc.device
    generator = ema_generator(run)                              # a sharded run's: gathered (every process)
    folder = Path(cfg.train.run_dir) / "samples"
    points = teacher.shape == (2,)
    n = 2000 if points else cfg.train.num_samples
    cond = run.conditions.fixed(n, device) if isinstance(run.conditions, Prompts) else None
    teacher_png = folder / "teacher.png"
    reference = None
    if run.sharded and any_process(acc.is_main_process and not teacher_png.is_file(), acc):
        reference = teacher_reference(run, n, cond)             # the sharded teacher: on every process
    if not acc.is_main_process:
        return
    folder.mkdir(exist_ok=True)
    path = folder / f"samples-{run.nimg:012d}.png"
    x = teacher.decode(generator.sample_seeds(range(n), device=device, cond=cond))
    if points:                                                  # a scatter over the teacher's samples
        if teacher.exact_samples:
            reference = teacher.sample(2000, torch.Generator().manual_seed(0))
        else:
            with run.autocast(), torch.compiler.set_stance("force_eager"):
                reference = sample_teacher(teacher.denoiser, teacher.shape, 18, "heun", range(2000), device=device)
        save_samples(x, path, reference, title=f"{run.nimg} images, lam={cfg.loss.lam}")
        log_picture(run, "samples", path)
        return
    if not save_samples(x, path):                               # neither images nor 2-D points: nothing to draw
        return
    if not teacher_png.is_file():
        reference = reference if reference is not None else teacher_reference(run, n, cond)
        save_image_grid(teacher.decode(reference), teacher_png)
        if cond is not None:
            (folder / "prompts.txt").write_text("\n".join(run.conditions.fixed_prompts(n)) + "\n")
    guided = f", κ = {run.loss.guide_teacher:g}" if run.loss.guide_teacher != 1 else ""
    save_panels([(image_grid(x), f"one-step generator, {run.nimg:,} images, λ={run.loss.lam:g}"),
                 (np.asarray(Image.open(teacher_png)), f"teacher, Heun, 35 evaluations{guided}")],
                folder / "compare.png")
    log_picture(run, "samples", folder / "compare.png")


def teacher_reference(run: Run, n: int, cond) -> torch.Tensor:
    """The teacher's Heun samples (35 evaluations) at seeds 0..n-1, under the loss's teacher guidance: the grids'
    reference, drawn once, eagerly (not worth a compile)."""
    teacher = run.teacher
    with run.autocast(), torch.compiler.set_stance("force_eager"):
        return sample_teacher(teacher.denoiser, teacher.shape, 18, "heun", range(n), device=run.accelerator.device,
                              cond=cond, guidance=run.loss.guide_teacher, null=teacher.null_condition)


def save_checkpoint(run: Run, logger: MetricsLogger, guard: NonFiniteGuard) -> None:
    """Training state (resumable: with the unfinished log interval's sums and the NaN guard's streak) and the
    exported EMA generator (the deliverable), by the main process; a sharded run's networks are gathered for it
    first. Weights that are not finite are not saved (one line): the states already written stay the last good
    ones."""
    acc = run.accelerator
    metrics, nonfinite = logger.state_dict(), guard.state_dict()      # collectives: on every process
    states = network_states(run)                                     # collectives when sharded
    acc.wait_for_everyone()
    if acc.is_main_process:
        if not all_finite(states["fake_score"], states["generator"], states["ema"]):
            print(f"warning: no training state at {run.nimg:,} images: the weights hold NaN or inf; the states "
                  f"already in {run.cfg.train.run_dir} stay the last finite ones", file=sys.stderr, flush=True)
        else:
            state = {"nimg": run.nimg, "step": run.step, "seconds": logger.elapsed(), "config": to_dict(run.cfg),
                     **states, "metrics": metrics, "nonfinite": nonfinite, "conditions": run.conditions.state_dict()}
            save_training_state(run.cfg.train.run_dir, run.nimg, state, keep=run.cfg.train.keep_ckpts)
            export(run, "generator", plain_generator(run, states["ema"]))
    acc.wait_for_everyone()


def network_states(run: Run) -> dict:
    """What a training state holds of the networks and optimisers: the students' own tensors (a LoRA student's
    adapters), the EMA's, Adam's moments by parameter index; a sharded run's gathered whole for the main process
    (a collective: every process calls it; the others get empty states)."""
    states = {"fake_score": Owned(run.fake_score, run.shared).state_dict(),
              "generator": Owned(run.generator, run.shared).state_dict(),
              "ema": Owned(run.ema.model, run.shared).state_dict(),
              "opt_fake": run.opt_fake.state_dict(), "opt_g": run.opt_g.state_dict()}
    if run.sharded:
        states = {name: full_state(state, run.accelerator.is_main_process) for name, state in states.items()}
    return states


def ema_generator(run: Run) -> OneStepGenerator | None:
    """The EMA generator as one module: itself, or for a sharded run a copy gathered whole on the main process (a
    collective: every process calls it; None off the main process)."""
    if not run.sharded:
        return run.ema.model
    return plain_generator(run, full_state(run.ema.model.state_dict(), run.accelerator.is_main_process))


def plain_generator(run: Run, state: dict) -> OneStepGenerator | None:
    """The EMA generator of a gathered ``state`` (sharded runs; on the main process), else the EMA itself."""
    if not run.sharded:
        return run.ema.model
    if not run.accelerator.is_main_process:
        return None
    return loaded(run.template, state).to(run.accelerator.device).eval().requires_grad_(False)


def export(run: Run, folder: str, generator: OneStepGenerator | None = None, **extra) -> None:
    """The EMA generator (or ``generator``, a sharded run's gathered one) to ``run_dir/folder``, its config naming
    the image count, λ and the run's config; a LoRA generator merged into a full network (and, with
    ``lora.save_adapter``, its adapter alone in ``adapter/``)."""
    generator = run.ema.model if generator is None else generator
    out = Path(run.cfg.train.run_dir) / folder
    if is_lora(generator):
        if run.cfg.lora.save_adapter:
            save_adapter(generator.denoiser, run.teacher, run.cfg.lora, out / "adapter")
        generator = merged(generator)
    export_generator(generator, run.teacher.spec, out,
                     extra={"nimg": run.nimg, "lam": run.loss.lam, **extra, "config": to_dict(run.cfg)},
                     components=run.teacher.components())


def flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> flat {'a.b': scalar} for TensorBoard's hparams."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(as_tuple(v) if v is not None else v)
    return out
