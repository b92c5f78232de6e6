"""Data-free distillation: builders, then one loop alternating fake-score and generator updates (sid-math.md §2.2).

The only module that knows Accelerate. Precision policy, stated once: trainable networks keep fp32 master
weights; with ``train.precision=bf16`` every network forward runs under one bf16 autocast, while the
preconditioning, the losses and the optimisers stay in fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from sid.checkpoint import check_fresh_start, load_training_state, resolve_resume, restore, save_training_state
from sid.config import as_tuple, to_dict, to_yaml
from sid.ema import EMA, ema_beta
from sid.errors import SidError
from sid.fid import generator_fid, load_reference, make_fid
from sid.generator import OneStepGenerator, export_generator, num_params
from sid.images import image_grid, save_image_grid, save_panels, save_samples
from sid.losses import LAMBDA_PRESETS, fake_score_loss, generator_loss, resolve_lam
from sid.precond import Preconditioned
from sid.sampling import sample_teacher
from sid.schedules import sample_lognormal_sigma, sample_sid_sigma
from sid.teachers import Teacher, build_teacher
from sid.teachers.analytic import sliced_wasserstein


@dataclass
class Run:
    """Everything the loop touches, built before it starts."""

    accelerator: Accelerator
    teacher: Teacher
    fake_score: torch.nn.Module          # f_ψ (unwrapped)
    generator: OneStepGenerator          # G_θ (unwrapped)
    fake_ddp: torch.nn.Module            # the same modules as prepared by Accelerate (DDP on several processes)
    generator_ddp: torch.nn.Module
    opt_fake: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    ema: EMA
    nimg: int = 0
    step: int = 0
    seconds: float = 0.0                 # wall-clock seconds of the sessions before this one (resumed runs)
    bf16: bool = False

    def autocast(self):
        """The one mixed-precision policy: network forwards in bf16 under autocast, everything else fp32.

        Stated here rather than through Accelerate's ``mixed_precision``, which is fixed once per process.
        """
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Every step reseeds from (seed, rank, step): resumed runs draw exactly the numbers the original did."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63)


def micro_batches(cfg, world_size: int) -> tuple[int, int]:
    """(per-process micro-batch, accumulation rounds) for the configured global batch."""
    batch, batch_gpu = cfg.optim.batch, cfg.optim.batch_gpu
    if batch % world_size:
        raise SidError(f"optim.batch={batch} is not divisible by the {world_size} processes")
    per_process = batch // world_size
    batch_gpu = batch_gpu or per_process
    if per_process % batch_gpu:
        raise SidError(f"optim.batch_gpu={batch_gpu} must divide the per-process batch {per_process}")
    return batch_gpu, per_process // batch_gpu


def use_bf16(precision: str, device: torch.device) -> bool:
    """``train.precision``: auto is bf16 on GPUs and fp32 elsewhere."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def use_compile(compile: bool | None, device: torch.device) -> bool:
    """``perf.compile``: null compiles on GPUs, where the speed repays the compile time, and not on CPUs."""
    return device.type == "cuda" if compile is None else compile


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa) for fp32 matmuls and convolutions on CUDA; process-wide."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def diffusers_models(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if hasattr(m, "enable_gradient_checkpointing")]


def apply_perf(perf, bf16: bool, teacher: torch.nn.Module, students: list[torch.nn.Module]) -> None:
    """The ``perf`` switches that change how networks are stored; before optimisers and EMA are built."""
    if perf.grad_checkpointing:                 # diffusers UNets block by block, other backbones as a whole
        for net in (teacher, *students):
            unets = diffusers_models(net)
            for unet in unets:
                unet.enable_gradient_checkpointing()
            for m in [] if unets else net.modules():
                if isinstance(m, Preconditioned):
                    m.checkpoint = True
    if perf.channels_last:
        for net in (teacher, *students):
            net.to(memory_format=torch.channels_last)
    if bf16 and perf.teacher_bf16 and hasattr(teacher, "net"):
        teacher.net.to(torch.bfloat16)          # the backbone only: preconditioning stays fp32 (precond.py)


def build(cfg, accelerator: Accelerator, resume: str | None) -> Run:
    """Teacher, students, optimisers and EMA, restored from a checkpoint when resuming."""
    device = accelerator.device
    bf16 = use_bf16(cfg.train.precision, device)
    if device.type == "cuda":
        set_tf32(cfg.perf.tf32)
    torch.manual_seed(cfg.train.seed)          # identical networks on every process (also a random-init teacher)
    teacher = build_teacher(cfg.teacher)
    fake_score = teacher.make_student()
    generator = OneStepGenerator(teacher.make_student(), teacher.shape, cfg.generator.sigma_init)
    teacher.denoiser.to(device).eval().requires_grad_(False)
    apply_perf(cfg.perf, bf16, teacher.denoiser, [fake_score, generator])

    def adam(module, lr, betas):
        return torch.optim.Adam(module.parameters(), lr=lr, betas=tuple(betas), eps=cfg.optim.eps,
                                fused=cfg.perf.fused_adam or None)

    opt_fake = adam(fake_score, cfg.optim.fake_lr, cfg.optim.fake_betas)
    opt_g = adam(generator, cfg.optim.g_lr, cfg.optim.g_betas)
    ema = EMA(generator, cfg.ema.halflife_nimg, cfg.ema.rampup)
    nimg = step = 0
    seconds = 0.0
    path = resolve_resume(resume, cfg.train.run_dir) if resume else None
    if path is not None:
        state = load_training_state(path)
        restore(path, state, fake_score=fake_score, generator=generator, ema=ema.model, opt_fake=opt_fake,
                opt_g=opt_g)
        nimg, step, seconds = state["nimg"], state["step"], state.get("seconds", 0.0)
        accelerator.print(f"resumed from {path} at {nimg} images")
    ema.to(device)
    if use_compile(cfg.perf.compile, device):   # in place: state_dict keys and the EMA copy stay uncompiled
        accelerator.print("torch.compile: the networks compile during the first iterations (perf.compile=false: eager)")
        for net in (teacher.denoiser, fake_score, generator):
            net.compile()
    fake_ddp, generator_ddp, opt_fake, opt_g = accelerator.prepare(fake_score, generator, opt_fake, opt_g)
    return Run(accelerator, teacher, fake_score, generator, fake_ddp, generator_ddp, opt_fake, opt_g, ema, nimg, step,
               seconds, bf16=bf16)


def describe(cfg, run: Run) -> str:
    """One line on what is about to run: teacher, loss, batch, machine, budget, folder."""
    acc, lam, params = run.accelerator, cfg.loss.lam, num_params(run.teacher.denoiser)
    size = f"{params / 1e6:.2f}M parameters, " if params else ""
    named = f" ({lam})" if str(lam) in LAMBDA_PRESETS else ""
    processes = f"{acc.num_processes} {acc.device.type} process{'es' if acc.num_processes > 1 else ''}"
    budget = f"{cfg.train.total_nimg:,} images" + (f" or {cfg.train.max_seconds:g} s" if cfg.train.max_seconds else "")
    return (f"distilling the {cfg.teacher.kind} teacher ({size}samples {'×'.join(map(str, run.teacher.shape))}) "
            f"into a one-step generator: λ = {resolve_lam(lam):g}{named}, weighting {cfg.loss.weighting}, "
            f"batch {cfg.optim.batch} on {processes}, {'bf16 autocast' if run.bf16 else 'fp32'}"
            f"{', compiled' if use_compile(cfg.perf.compile, acc.device) else ''}; "
            f"{f'from {run.nimg:,} ' if run.nimg else ''}to {budget}, in {cfg.train.run_dir}")


def keep_finite(per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop samples whose loss is not finite (SiD's NaN policy, §5.1); returns (losses, number dropped)."""
    finite = per_sample.isfinite()
    return torch.where(finite, per_sample, torch.zeros_like(per_sample)), (~finite).sum()


def sanitize_grads(module: torch.nn.Module) -> torch.Tensor:
    """nan_to_num on every gradient (SiD: nan -> 0, ±inf -> ±1e5); returns whether any was non-finite.

    The check is one foreach norm: a NaN or ±inf anywhere makes the total norm non-finite.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    bad = torch.nn.utils.get_total_norm(grads).isfinite().logical_not()
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    return bad


def accumulate(run: Run, model: torch.nn.Module, rounds: int, micro_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward ``micro_loss()`` over accumulation rounds, all-reducing gradients only on the last one.

    ``micro_loss`` returns per-sample losses already multiplied by their scale / per-process batch.
    Returns (summed loss, samples dropped), both as tensors: no host sync here.
    """
    total, dropped = 0.0, 0
    for r in range(rounds):
        sync = contextlib.nullcontext() if r == rounds - 1 else run.accelerator.no_sync(model)
        with sync, run.autocast():
            loss, n_bad = keep_finite(micro_loss())
            run.accelerator.backward(loss.sum())
        total, dropped = total + loss.detach().sum(), dropped + n_bad
    return total, dropped


def train(cfg, resume: str | None = None) -> Run:
    """Distil ``cfg.teacher`` into a one-step generator; returns the finished run (for tests and notebooks)."""
    run_dir = Path(cfg.train.run_dir)
    check_fresh_start(run_dir, resume)
    accelerator = Accelerator(log_with="tensorboard" if cfg.train.tensorboard else None, project_dir=str(run_dir))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if cfg.on_cpu and accelerator.device.type == "cpu":
        applied = " ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in _flat(to_dict(cfg.on_cpu)))
        accelerator.print(f"no GPU visible: on_cpu settings applied ({applied})")
    run = build(cfg, accelerator, resume)
    accelerator.print(describe(cfg, run))
    if cfg.train.tensorboard:   # a resumed run hides the events past its checkpoint, as metrics.jsonl drops them
        accelerator.init_trackers("tensorboard", config=_flat(to_dict(cfg)),
                                  init_kwargs={"tensorboard": {"purge_step": run.nimg + 1}} if run.nimg else {})
    start = time.time()
    batch_gpu, _ = micro_batches(cfg, accelerator.num_processes)
    advice = (f"at optim.batch_gpu={batch_gpu} per process: set a smaller optim.batch_gpu (optim.batch stays, by "
              "gradient accumulation) or perf.grad_checkpointing=true")
    try:
        with GracefulStop() as stop, out_of_memory_advice(advice, run_dir):
            interrupted = loop(cfg, run, stop)
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


def make_step(cfg, run: Run):
    """One training iteration as a function of nothing: fake-score update, generator update, EMA update
    (with ``loss.reuse_generator_batch``: generator update, then the fake-score update on its samples).

    Returns device tensors (loss_fake, loss_g, samples dropped, whether anything was non-finite) and never
    syncs with the host, so the loop and the speed benchmark (eval/bench_speed.py) run the same code.
    """
    acc, device = run.accelerator, run.accelerator.device
    batch_gpu, rounds = micro_batches(cfg, acc.num_processes)
    per_process = batch_gpu * rounds
    lam = resolve_lam(cfg.loss.lam)
    sigma_min = cfg.loss.sigma_min or run.teacher.denoiser.sigma_min
    sigma_max = cfg.loss.sigma_max or run.teacher.denoiser.sigma_max
    sigma_data = run.fake_score.sigma_data
    teacher, fake_score, generator = run.teacher.denoiser, run.fake_score, run.generator

    reused = []                         # the generator step's samples, detached, when the fake step reuses them

    def fake_micro_loss():
        if reused:
            x_g, labels = reused.pop(0)
        else:
            z, labels = generator.random_inputs(batch_gpu, device)
            with torch.no_grad():
                x_g = generator(z, labels)                                      # G in eval mode (§2.3 step 1)
        sigma = sample_lognormal_sigma(batch_gpu, cfg.loss.p_mean, cfg.loss.p_std, device=device)
        per_sample = fake_score_loss(run.fake_ddp, x_g.detach(), sigma, labels, sigma_data=sigma_data)
        return per_sample * (cfg.loss.fake_scale / per_process)

    def generator_micro_loss():
        z, labels = generator.random_inputs(batch_gpu, device)
        x_g = run.generator_ddp(z, labels)
        if cfg.loss.reuse_generator_batch:
            reused.append((x_g.detach(), labels))
        sigma = sample_sid_sigma(batch_gpu, cfg.loss.t_max, sigma_min, sigma_max, cfg.loss.rho, device=device)
        per_sample = generator_loss(teacher, fake_score, x_g, sigma, labels, lam=lam, weighting=cfg.loss.weighting)
        return per_sample * (cfg.loss.g_scale / per_process)

    def update_fake_score():
        """f_ψ fits the current generator's samples (§2.3)."""
        generator.eval()
        fake_score.train().requires_grad_(True)
        loss, dropped = accumulate(run, run.fake_ddp, rounds, fake_micro_loss)
        bad = sanitize_grads(fake_score)
        run.opt_fake.step()
        run.opt_fake.zero_grad(set_to_none=True)
        return loss, dropped, bad

    def update_generator():
        """f_φ and f_ψ frozen in their parameters, differentiable in their inputs (§2.4)."""
        fake_score.eval().requires_grad_(False)
        generator.train()
        loss, dropped = accumulate(run, run.generator_ddp, rounds, generator_micro_loss)
        bad = sanitize_grads(generator)
        run.opt_g.step()
        run.opt_g.zero_grad(set_to_none=True)
        return loss, dropped, bad

    def step():
        torch.manual_seed(step_seed(cfg.train.seed, acc.process_index, run.step))
        if not cfg.loss.reuse_generator_batch:
            loss_fake, dropped_fake, bad_fake = update_fake_score()
            loss_g, dropped_g, bad_g = update_generator()
        else:
            # The same sequence of updates with the fake step moved after the generator step, on its samples:
            # fake(fresh) once at the start, then per iteration generator, fake(that generator batch).
            _, dropped_first, bad_first = update_fake_score() if run.step == 0 else (None, 0, False)
            loss_g, dropped_g, bad_g = update_generator()
            loss_fake, dropped_fake, bad_fake = update_fake_score()
            dropped_fake, bad_fake = dropped_fake + dropped_first, bad_fake | bad_first
        run.nimg += cfg.optim.batch
        run.step += 1
        run.ema.update(generator, run.nimg, cfg.optim.batch)
        return loss_fake, loss_g, dropped_fake + dropped_g, bad_fake | bad_g | (dropped_fake + dropped_g > 0)

    return step


def loop(cfg, run: Run, stop: GracefulStop) -> bool:
    """Train until ``train.total_nimg`` or ``train.max_seconds``; returns whether a signal stopped it (then the
    last step is checkpointed, after its scheduled samples and evaluation but without the end-of-run ones)."""
    step = make_step(cfg, run)
    logger = MetricsLogger(cfg, run.accelerator, run.nimg, run.seconds)
    evaluate = build_evaluator(cfg, run) if cfg.eval.every_nimg else None
    streak = torch.zeros((), device=run.accelerator.device, dtype=torch.long)   # consecutive non-finite steps
    deadline = time.time() + cfg.train.max_seconds if cfg.train.max_seconds else None
    batch, done, stopped = cfg.optim.batch, run.nimg >= cfg.train.total_nimg, False

    while not done:
        loss_fake, loss_g, dropped, bad = step()

        # Maintenance: metrics, samples, checkpoints; host syncs happen only here.
        streak = (streak + 1) * bad
        logger.accumulate(loss_fake, loss_g, dropped, bad, streak)
        done = run.nimg >= cfg.train.total_nimg
        at_log = crossed(run.nimg, batch, cfg.train.log_every_nimg) or done
        stopped = stop.agreed(run.accelerator, at_log) and not done       # on the last step: finish normally
        if at_log or stopped:
            logger.flush(run.nimg, run.step, ema_beta(batch, run.nimg, cfg.ema.halflife_nimg, cfg.ema.rampup))
            done = done or (deadline is not None and past(deadline, run.accelerator))
        if crossed(run.nimg, batch, cfg.train.sample_every_nimg) or done:
            save_sample_grid(cfg, run)
        if evaluate and (crossed(run.nimg, batch, cfg.eval.every_nimg) or done):
            logger.write({"nimg": run.nimg, "seconds": logger.elapsed(), **evaluate()})    # when it began
        if crossed(run.nimg, batch, cfg.train.ckpt_every_nimg) or done or stopped:
            logger.check_finite()
            save_checkpoint(cfg, run, logger.elapsed())
        if stopped:
            break
    logger.close()
    return stopped


def any_process(flag: bool, accelerator: Accelerator) -> bool:
    """Whether ``flag`` holds on any process (a collective: every process calls it at the same step)."""
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max"))


def past(deadline: float, accelerator: Accelerator) -> bool:
    """Whether any process is past the wall-clock deadline: all processes stop at the same step."""
    return any_process(time.time() > deadline, accelerator)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after checkpointing its last step."""


class GracefulStop:
    """While active, SIGINT (Ctrl-C) and SIGTERM (a cluster's notice before it kills a job) ask the loop to
    stop at a step boundary and checkpoint that step; a second signal stops at once, as Python does (the
    checkpoints already written stay, saves being atomic). Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> GracefulStop:
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (several processes: "
              "at the next log interval); again: stop at once", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, accelerator: Accelerator, sync_point: bool) -> bool:
        """Whether all processes stop after this step: checked every step in one process; with several, at
        ``sync_point`` steps (log intervals) only, where one collective makes them agree."""
        if accelerator.num_processes == 1:
            return self.requested
        return sync_point and any_process(self.requested, accelerator)


@contextlib.contextmanager
def out_of_memory_advice(advice: str, run_dir: Path):
    """A CUDA out-of-memory error becomes one line saying what to lower (``advice``); the checkpoints already
    written stay, so the run resumes with the smaller setting."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        asked = re.search(r"Tried to allocate ([\d.]+ \w+)", str(e))
        size = f" (tried to allocate {asked[1]})" if asked else ""
        raise SidError(f"out of GPU memory{size} {advice}; the checkpoints already in {run_dir} are kept "
                       "(--resume)") from None


def crossed(nimg: int, batch: int, every: int) -> bool:
    """Whether the last step carried the image counter across a multiple of ``every``."""
    return nimg // every != (nimg - batch) // every


class MetricsLogger:
    """Running sums on the device; reduced across processes and written (JSONL, TensorBoard) every interval."""

    def __init__(self, cfg, accelerator: Accelerator, nimg: int, seconds: float = 0.0):
        """Starts at image ``nimg`` after ``seconds`` of earlier sessions (a resumed run)."""
        self.cfg, self.acc = cfg, accelerator
        self.path = Path(cfg.train.run_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            truncate_records(self.path, nimg)
        self.sums = torch.zeros(5, device=accelerator.device)   # loss_fake, loss_g, dropped, nonfinite, steps
        self.worst_streak = torch.zeros((), device=accelerator.device, dtype=torch.long)
        now = time.time()
        self.start_time, self.last_time, self.last_nimg = now - seconds, now, nimg
        # With a time budget the run usually ends on the clock, so the bar counts images without an image total.
        total, budget = cfg.train.total_nimg, cfg.train.max_seconds
        self.bar = tqdm(total=None if budget else total, initial=min(nimg, total), unit="img", unit_scale=True,
                        desc=f"{budget:g} s budget" if budget else None, dynamic_ncols=True,
                        disable=not (accelerator.is_main_process and cfg.train.progress))

    def accumulate(self, loss_fake, loss_g, dropped, bad, streak) -> None:
        self.sums += torch.stack([loss_fake.float(), loss_g.float(), dropped.float(), bad.float(),
                                  torch.ones((), device=self.sums.device)])
        self.worst_streak = torch.maximum(self.worst_streak, streak)

    def check_finite(self) -> None:
        worst = int(self.acc.gather(self.worst_streak[None]).max())
        if worst >= self.cfg.train.max_nonfinite_steps:
            raise SidError(
                f"aborting: {worst} consecutive steps had non-finite losses or gradients "
                f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); checkpoints already in "
                f"{self.cfg.train.run_dir} are kept. Lower optim.g_lr / optim.fake_lr, or use train.precision=fp32"
            )

    def flush(self, nimg: int, step: int, beta: float) -> None:
        self.check_finite()
        sums = self.acc.reduce(self.sums.clone(), "sum").tolist()
        steps = max(sums[4], 1)
        now = time.time()
        record = {
            "nimg": nimg, "step": step,
            "loss_fake": sums[0] / steps, "loss_g": sums[1] / steps,             # mean over processes and steps
            "dropped_samples": int(sums[2]), "nonfinite_steps": int(sums[3] / self.acc.num_processes),
            "img_per_s": (nimg - self.last_nimg) / max(now - self.last_time, 1e-9),
            "seconds": now - self.start_time, "ema_beta": beta,
        }
        self.sums.zero_()
        self.write(record)
        if self.acc.is_main_process:
            self.bar.update(nimg - self.last_nimg)
            self.bar.set_postfix(loss_g=f"{record['loss_g']:.4g}", loss_fake=f"{record['loss_fake']:.4g}")
        self.last_time, self.last_nimg = now, nimg

    def write(self, record: dict) -> None:
        """One record (losses, or FID) to metrics.jsonl and TensorBoard, from the main process."""
        if self.acc.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.cfg.train.tensorboard:
                self.acc.log({k: v for k, v in record.items() if k not in ("nimg", "step")}, step=record["nimg"])

    def elapsed(self) -> float:
        """Wall-clock seconds since the run started, earlier sessions of a resumed run included."""
        return time.time() - self.start_time

    def close(self) -> None:
        self.bar.close()


def truncate_records(path: Path, nimg: int) -> None:
    """Keep the records of ``path`` (JSONL) up to image ``nimg``, where a run (re)starts.

    The records past it belong to steps that a resumed run redoes bit-identically and logs again (or, for a
    fresh start, to an earlier attempt that left no checkpoint); a line torn by a kill is dropped too.
    """
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["nimg"] <= nimg:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    if kept != lines:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def build_evaluator(cfg, run: Run):
    """In-loop quality of the EMA generator on cfg.eval.num samples at fixed seeds, by the main process:
    proxy FID against reference statistics for image teachers, the sliced Wasserstein distance to exact
    samples for analytic teachers. Returns a function giving ``{"fid": v}`` or ``{"swd": v}``.

    Each value better than every earlier one of the run (lower; read back from metrics.jsonl when resuming)
    also exports the EMA generator to ``generator-best/``: SiD's results are the best snapshot of a run."""
    acc, teacher = run.accelerator, run.teacher.denoiser
    if hasattr(teacher, "sample"):
        name, reference = "swd", teacher.sample(cfg.eval.num, torch.Generator().manual_seed(0)).float()

        def measure():
            x = run.ema.model.sample_seeds(range(cfg.eval.num), device=acc.device).cpu()
            return sliced_wasserstein(x, reference)
    else:
        name, metric = "fid", make_fid(cfg.eval.fid_weights).to(acc.device) if acc.is_main_process else None
        if metric is not None:
            load_reference(metric, cfg.eval.fid_ref)

        def measure():
            return generator_fid(metric, run.ema.model, cfg.eval.num)

    best = best_record(Path(cfg.train.run_dir) / "metrics.jsonl", name)

    def evaluate():
        nonlocal best
        result = {name: measure()} if acc.is_main_process else {}
        if result and result[name] < best:                      # NaN is never better
            best = result[name]
            export(cfg, run, "generator-best", **result)
        acc.wait_for_everyone()
        return result

    return evaluate


def best_record(path: Path, name: str) -> float:
    """The lowest finite value of ``name`` among the records of ``path`` (JSONL); inf if none."""
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return min((r[name] for r in records if math.isfinite(r.get(name, math.inf))), default=math.inf)


def save_sample_grid(cfg, run: Run) -> None:
    """EMA-generator samples at fixed seeds 0..N-1 next to the teacher's: for images, ``samples-N.png`` (the
    generator's grid) and ``compare.png`` (it beside ``teacher.png``, the teacher's Heun samples at the same
    seeds, 35 evaluations, drawn once); for 2-D toys a scatter over exact teacher samples."""
    if not run.accelerator.is_main_process:
        return
    generator, teacher, device = run.ema.model, run.teacher.denoiser, run.accelerator.device
    folder = Path(cfg.train.run_dir) / "samples"
    folder.mkdir(exist_ok=True)
    n = cfg.train.num_samples if generator.shape != (2,) else 2000
    x = generator.sample_seeds(range(n), device=device)
    path = folder / f"samples-{run.nimg:012d}.png"
    if hasattr(teacher, "sample"):                              # analytic: exact teacher samples under the scatter
        reference = teacher.sample(2000, torch.Generator().manual_seed(0)).float()
        save_samples(x, path, reference, title=f"{run.nimg} images, lam={cfg.loss.lam}")
        return
    if not save_samples(x, path):                               # neither images nor 2-D points: nothing to draw
        return
    teacher_png = folder / "teacher.png"
    if not teacher_png.is_file():
        with run.autocast(), torch.compiler.set_stance("force_eager"):  # drawn once: not worth a compile
            reference = sample_teacher(teacher, run.teacher.shape, 18, "heun", range(n), device=device)
        save_image_grid(reference, teacher_png)
    save_panels([(image_grid(x), f"one-step generator, {run.nimg:,} images, λ={resolve_lam(cfg.loss.lam):g}"),
                 (np.asarray(Image.open(teacher_png)), "teacher, Heun, 35 evaluations")], folder / "compare.png")


def save_checkpoint(cfg, run: Run, seconds: float) -> None:
    """Training state (resumable) and the exported EMA generator (the deliverable); main process only.
    ``seconds``: the run's wall-clock time so far, which a resumed run continues from."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        state = {
            "nimg": run.nimg, "step": run.step, "seconds": seconds, "config": to_dict(cfg),
            "fake_score": run.fake_score.state_dict(), "generator": run.generator.state_dict(),
            "ema": run.ema.model.state_dict(),
            "opt_fake": run.opt_fake.state_dict(), "opt_g": run.opt_g.state_dict(),
        }
        save_training_state(cfg.train.run_dir, run.nimg, state, keep=cfg.train.keep_ckpts)
        export(cfg, run, "generator")
    run.accelerator.wait_for_everyone()


def export(cfg, run: Run, folder: str, **extra) -> None:
    """The EMA generator to ``run_dir/folder``, its config naming the image count, λ and the run's config."""
    export_generator(run.ema.model, run.teacher.spec, Path(cfg.train.run_dir) / folder,
                     extra={"nimg": run.nimg, "lam": resolve_lam(cfg.loss.lam), **extra, "config": to_dict(cfg)})


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> flat {'a.b': scalar} for TensorBoard's hparams."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(as_tuple(v) if v is not None else v)
    return out
