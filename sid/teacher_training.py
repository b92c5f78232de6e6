"""Train a small teacher on images: a diffusers UNet2DModel with EDM preconditioning and the EDM loss, or
(``loss.objective=flow``) a rectified-flow network predicting velocity with the flow-matching loss.

For users without a teacher, and for the shipped demo teacher. Reuses the distillation pieces: the same
denoising loss as the fake score, the EMA, the training-state format, the run infrastructure of
``sid/runtime.py`` (per-step reseeding for exact resume, signals, the metrics file) and Accelerate for devices
and processes. The result is a diffusers folder that ``teacher.diffusers.path`` loads as an ``edm`` (or
``flow``) teacher.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from sid.checkpoint import (
    all_finite,
    check_fresh_start,
    claimed,
    load_training_state,
    resolve_resume,
    restore,
    save_training_state,
    write_config,
)
from sid.config import plain, to_dict, to_yaml
from sid.data import load_images
from sid.ema import EMA
from sid.errors import SidError
from sid.generator import num_params
from sid.images import save_image_grid
from sid.losses import denoising_loss, flow_matching_loss
from sid.runtime import (
    GracefulStop,
    MetricsLogger,
    TrainingInterrupted,
    check_launch,
    crossed,
    out_of_memory_advice,
    precision_policy,
    sanitize_grads,
    step_seed,
)
from sid.sampling import sample_teacher
from sid.schedules import sample_lognormal_sigma
from sid.teachers.diffusers import denoiser_from_config, sample_shape, save_teacher


def train_teacher(cfg, resume: str | None = None):
    """Train until cfg.train.total_nimg images; returns (EMA denoiser, images seen). The run folder is claimed
    and locked as the distillation's is (``sid.checkpoint.claimed``)."""
    run_dir = Path(cfg.train.run_dir)
    check_fresh_start(run_dir, resume)
    acc = Accelerator()
    warning = check_launch(acc)
    if warning:
        acc.print(warning, file=sys.stderr)
    with claimed(run_dir, acc.is_main_process):
        return _train_teacher(cfg, acc, resume)


def _train_teacher(cfg, acc: Accelerator, resume: str | None):
    run_dir = Path(cfg.train.run_dir)
    images = load_images(cfg.data.source)                                   # uint8 [N, C, H, W], in memory
    torch.manual_seed(cfg.train.seed)
    denoiser = denoiser_from_config(plain(cfg.unet), cfg.loss.objective, cfg.loss.sigma_data)   # edm | flow rule
    shape = sample_shape(denoiser)
    if tuple(images.shape[1:]) != shape:
        raise SidError(f"images are {tuple(images.shape[1:])}, the UNet expects {shape} (unet.in_channels × "
                       "unet.sample_size²)")
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.999), eps=1e-8)
    ema = EMA(denoiser, cfg.ema.halflife_nimg, cfg.ema.rampup)
    nimg = step = 0
    seconds = 0.0                                                            # wall clock of earlier sessions
    path = resolve_resume(resume, run_dir) if resume else None
    if path is not None:
        state = load_training_state(path)
        restore(path, state, denoiser=denoiser, ema=ema.model, opt=opt)
        nimg, step, seconds = state["nimg"], state["step"], state.get("seconds", 0.0)
        for group in opt.param_groups:                       # the config's settings, not the checkpoint's
            group["betas"], group["eps"] = (0.9, 0.999), 1e-8
    if acc.is_main_process:                                  # only once build and restore succeeded
        write_config(run_dir, to_yaml(cfg), nimg)
    ema.to(acc.device)
    ddp, opt = acc.prepare(denoiser, opt)
    batch = cfg.optim.batch
    per_process = batch // acc.num_processes
    bf16, precision = precision_policy(cfg.train.precision, acc)
    acc.print(f"teacher: {num_params(denoiser) / 1e6:.2f}M parameters, {len(images)} images of "
              f"{tuple(images.shape[1:])}; {'bf16 autocast' if bf16 else 'fp32'} ({precision})")
    logger = MetricsLogger(acc, run_dir, {"loss": "mean"}, nimg, seconds, total_nimg=cfg.train.total_nimg,
                           progress=cfg.train.progress)
    stopped = False
    advice = f"at optim.batch={batch} ({per_process} per process): set a smaller optim.batch"
    with GracefulStop() as stop, out_of_memory_advice(advice, run_dir):
        while nimg < cfg.train.total_nimg:
            torch.manual_seed(step_seed(cfg.train.seed, acc.process_index, step))
            x0 = images[torch.randint(len(images), (per_process,))].to(acc.device).float() / 127.5 - 1
            if cfg.data.xflip:
                x0 = torch.where(torch.rand(per_process, 1, 1, 1, device=acc.device) < 0.5, x0.flip(-1), x0)
            sigma = sample_lognormal_sigma(per_process, cfg.loss.p_mean, cfg.loss.p_std, device=acc.device)
            for group in opt.param_groups:                                   # linear warm-up
                group["lr"] = cfg.optim.lr * min(1.0, (nimg + batch) / max(cfg.optim.warmup_nimg, 1))
            with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=bf16):
                if cfg.loss.objective == "flow":
                    loss = flow_matching_loss(ddp, x0, sigma).mean()
                else:
                    loss = denoising_loss(ddp, x0, sigma, sigma_data=cfg.loss.sigma_data).mean()
            acc.backward(loss)
            sanitize_grads(denoiser)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(denoiser, nimg, batch)                                # before this step's images count
            nimg, step = nimg + batch, step + 1
            logger.add(loss=loss.detach())

            done = nimg >= cfg.train.total_nimg
            at_log = crossed(nimg, batch, cfg.train.log_every_nimg) or done
            stopped = stop.agreed(acc, at_log) and not done                # a signal: checkpoint, then stop
            if at_log or stopped:
                logger.flush(nimg, step)
            if acc.is_main_process and (crossed(nimg, batch, cfg.train.sample_every_nimg) or done):
                save_teacher_samples(ema.model, shape, run_dir / "samples" / f"samples-{nimg:012d}.png", acc.device)
            if crossed(nimg, batch, cfg.train.ckpt_every_nimg) or done or stopped:
                acc.wait_for_everyone()
                if acc.is_main_process and not all_finite(denoiser.state_dict(), ema.model.state_dict()):
                    print(f"warning: no training state at {nimg:,} images: the weights hold NaN or inf; the states "
                          f"already in {run_dir} stay the last finite ones", file=sys.stderr, flush=True)
                elif acc.is_main_process:
                    state = {"nimg": nimg, "step": step, "seconds": logger.elapsed(), "config": to_dict(cfg),
                             "denoiser": denoiser.state_dict(), "ema": ema.model.state_dict(),
                             "opt": opt.state_dict()}
                    save_training_state(run_dir, nimg, state, keep=cfg.train.keep_ckpts)
                    save_teacher(ema.model, run_dir / "teacher", torch.float16 if cfg.train.export_fp16 else None)
                acc.wait_for_everyone()
            if stopped:
                break
    logger.close()
    if stopped:
        raise TrainingInterrupted(f"interrupted at {nimg:,} images, checkpointed in {run_dir}")
    return ema.model, nimg


def save_teacher_samples(denoiser, shape, path: Path, device, num: int = 64, steps: int = 18) -> None:
    """Heun samples (35 evaluations) of the EMA teacher at seeds 0..num-1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(sample_teacher(denoiser, shape, steps, "heun", range(num), device=device), path)
