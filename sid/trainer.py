"""Data-free distillation: one training iteration, and the loop around it.

One iteration (SiD, Zhou et al. 2024, Algorithm 1) updates the fake score on the generator's samples, then the
generator through the frozen teacher and fake score, then the generator's EMA. The run it works on is built in
``sid/run.py``; checkpoints, pictures, evaluation and the tracker are ``sid/maintenance.py``'s.
"""

from __future__ import annotations

import contextlib
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from sid.checkpoint import check_fresh_start, claimed, write_config
from sid.config import to_dict, to_yaml
from sid.ema import ema_beta
from sid.errors import SidError, described
from sid.generator import push_to_hub as upload  # the trainer's argument takes the name
from sid.maintenance import build_evaluator, choose_tracker, draw_samples, flat, save_checkpoint, start_tracker
from sid.run import Run, build, describe, set_training, use_compile
from sid.runtime import (
    GracefulStop,
    MetricsLogger,
    NonFiniteGuard,
    TrainingInterrupted,
    check_launch,
    crossed,
    keep_finite,
    out_of_memory_advice,
    past,
    sanitize_grads,
    step_seed,
)

__all__ = ["TrainingInterrupted", "iteration", "loop", "train"]


# One iteration ---------------------------------------------------------------------------------------------------

class Update(NamedTuple):
    """What one optimiser update of a network leaves: device tensors only."""

    loss: torch.Tensor                   # the summed per-sample losses of the process's micro-batches
    dropped: torch.Tensor                # samples whose loss was not finite
    bad: torch.Tensor                    # a non-finite gradient, or most samples' losses non-finite
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
    first = drawn_steps(run)
    clip = fake_clip(run.cfg)

    # Update fake score: f_ψ fits fresh samples of the current generator, drawn with G in eval mode (optim.
    # fake_updates times: DMD2's two time-scale rule). With loss.reuse_generator_batch only the first iteration
    # does; later ones fit the generator step's samples.
    if not reuse or run.step == 0:
        run.generator.eval()
        set_training(run.fake_score, True, run.shared)
        for _ in range(run.cfg.optim.fake_updates):
            fake_updates.append(update(run, run.fake_score, run.fake_ddp, run.opt_fake,
                                       partial(fake_score_micro_loss, run, None, first), clip))

    # Update generator: f_φ and f_ψ frozen in their parameters, differentiable in their inputs (SiDA: only once
    # the fake score has had loss.g_start_nimg images).
    set_training(run.fake_score, False, run.shared)
    run.generator.train()
    if run.real is None or run.nimg >= run.cfg.loss.g_start_nimg:
        g = update(run, run.generator, run.generator_ddp, run.opt_g, partial(generator_micro_loss, run, first))
    else:
        zero = torch.zeros((), device=run.accelerator.device)
        g = Update(zero, zero.long(), zero.bool(), [])

    if reuse:                            # f_ψ fits the samples of the generator step just taken (detached)
        run.generator.eval()
        set_training(run.fake_score, True, run.shared)
        fake_updates.append(update(run, run.fake_score, run.fake_ddp, run.opt_fake,
                                   partial(fake_score_micro_loss, run, g.samples, first)))

    # Update EMA, its ramp-up counting the images before this iteration's (as SiD's and EDM's loops).
    for ema in run.emas:
        ema.update(run.generator, run.nimg, run.cfg.optim.batch)
    run.nimg += run.cfg.optim.batch
    run.step += 1

    dropped = sum((u.dropped for u in fake_updates), g.dropped)
    bad = g.bad                          # a dropped sample alone is not a non-finite step; most of them are
    for u in fake_updates:
        bad = bad | u.bad
    return Stats(fake_updates[-1].loss, g.loss, dropped, bad)


def drawn_steps(run: Run) -> int | None:
    """With ``generator.random_steps``, the generator runs the first k of its K steps this iteration, k ~ U{1..K},
    the same k in both steps and on every process (SiD-DiT draws it once per iteration and broadcasts it), drawn
    from (seed, step) alone, so a resumed run draws it again; else None (all K)."""
    steps = run.generator.steps
    if not run.cfg.generator.random_steps or steps == 1:
        return None
    draw = torch.Generator().manual_seed(step_seed(run.cfg.train.seed, 0, run.step))
    return int(torch.randint(1, steps + 1, (1,), generator=draw))


def fake_clip(cfg) -> float | None:
    """``optim.fake_clip``, or the member's own: SiDA clips the fake score's gradients at 1 (sida_training_loop.py,
    ``clip_grad_value_`` whenever its GAN is on), the others not at all."""
    if cfg.optim.fake_clip is not None:
        return cfg.optim.fake_clip
    return 1.0 if cfg.loss.kind == "sida" else None


def draw_inputs(run: Run) -> tuple[torch.Tensor, object]:
    """A micro-batch of generator inputs: z ~ N(0, I) and conditions from the run's source."""
    device = run.accelerator.device
    z = torch.randn(run.batch_gpu, *run.generator.shape, device=device)
    return z, run.conditions.draw(run.batch_gpu, device)


def adversarial_micro_loss(run: Run, first: int | None) -> tuple[torch.Tensor, tuple]:
    """A micro-batch of SiDA's fake-score loss: real images (in the teacher's space) and generator samples drawn
    for the real images' labels (a class-conditional teacher; SiDA's loop draws both from its dataset)."""
    device = run.accelerator.device
    x_real, labels = run.real.draw(run.batch_gpu, device)
    z, drawn = draw_inputs(run)
    labels = run.loss.fake_conditions(labels if run.teacher.label_dim else drawn)
    with torch.no_grad():
        x_g = run.generator(z, labels, first=first)
    return run.loss.fake_score_adversarial(run.fake_ddp, run.logits.logits, x_g, x_real, labels), (x_g, labels)


def fake_score_micro_loss(run: Run, samples: list | None, first: int | None, r: int) -> tuple[torch.Tensor, tuple]:
    """Micro-batch ``r`` of the fake-score loss: on ``samples[r]``, or (None) on fresh generator samples. With
    guidance on the fake score, a share of the conditions becomes the null one before the samples are drawn, as
    SiD-LSG drops prompts (on reused samples, only the fake score's conditions are replaced)."""
    if run.real is not None:
        return adversarial_micro_loss(run, first)
    if samples is None:
        z, labels = draw_inputs(run)
        labels = run.loss.fake_conditions(labels)
        with torch.no_grad():
            x_g = run.generator(z, labels, first=first)
    else:
        x_g, labels = samples[r]
        labels = run.loss.fake_conditions(labels)
    return run.loss.fake_score(run.fake_ddp, x_g, labels), (x_g, labels)


def generator_micro_loss(run: Run, first: int | None, r: int) -> tuple[torch.Tensor, tuple]:
    """Micro-batch ``r`` of the generator loss, through the frozen teacher and fake score (the generator's first
    ``first`` steps; None: all)."""
    z, labels = draw_inputs(run)
    x_g = run.generator_ddp(z, labels, first=first)
    adversarial = run.real is not None and run.nimg >= run.cfg.loss.gan_start_nimg
    logits = run.logits.logits if adversarial else None
    return run.loss.generator(run.teacher.denoiser, run.fake_score, x_g, labels, logits), (x_g.detach(), labels)


def update(run: Run, module: torch.nn.Module, ddp: torch.nn.Module, optimizer: torch.optim.Optimizer,
           micro_loss: Callable[[int], tuple[torch.Tensor, tuple]], clip: float | None = None) -> Update:
    """One optimiser step of ``module``: gradients accumulated over the micro-batches (all-reduced on the last
    one only), non-finite samples dropped and gradients sanitised (SiD's NaN policy) and clipped to [−clip, clip]
    where asked, the step, cleared grads.
    A step that dropped more than half of its samples is counted non-finite, as one with a non-finite gradient is
    (a run whose every loss has diverged must not train on nothing and report success)."""
    total, dropped, samples = 0.0, 0, []
    for r in range(run.rounds):
        sync = contextlib.nullcontext() if r == run.rounds - 1 else run.accelerator.no_sync(ddp)
        with sync, run.autocast():
            per_sample, sample = micro_loss(r)
            per_sample, n_bad = keep_finite(per_sample)
            run.accelerator.backward(per_sample.sum())
        total, dropped = total + per_sample.detach().sum(), dropped + n_bad
        samples.append(sample)
    bad = sanitize_grads(module) | (2 * dropped > run.batch_gpu * run.rounds)
    if clip is not None:
        torch.nn.utils.clip_grad_value_([p for p in module.parameters() if p.grad is not None], clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return Update(total, dropped, bad, samples)


# The loop --------------------------------------------------------------------------------------------------------

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
            beta = ema_beta(batch, run.nimg - batch, run.ema.halflife_nimg, cfg.ema.rampup)   # the last update's
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
            raise SidError(f"torch.compile failed ({described(cause, 200)}); "
                           "set perf.compile=false to train without it") from None
        raise
    accelerator.end_training()
    if interrupted:
        raise TrainingInterrupted(f"interrupted at {run.nimg:,} images, checkpointed in {run_dir}")
    accelerator.print(f"stopped at {run.nimg:,} images after {time.time() - start:.0f} s; generator in "
                      f"{run_dir / 'generator'}, samples in {run_dir / 'samples'}")
    return run
