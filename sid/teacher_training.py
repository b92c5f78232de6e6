"""Train a small teacher on images: a diffusers UNet2DModel with EDM preconditioning and the EDM loss, or (``objective:
flow``) a rectified-flow network predicting velocity with the flow-matching loss.

For users without a teacher, and for the shipped demo teacher. Reuses the distillation pieces: the same
denoising loss as the fake score, the EMA, the training-state format, per-step reseeding (exact resume)
and Accelerate for devices and processes. The result is a diffusers folder that ``teacher.diffusers.path``
loads as an ``edm`` (or ``flow``) teacher.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from sid.checkpoint import check_fresh_start, load_training_state, resolve_resume, restore, save_training_state
from sid.config import plain, to_dict, to_yaml
from sid.data import load_images
from sid.ema import EMA
from sid.errors import SidError
from sid.generator import num_params
from sid.images import save_image_grid
from sid.losses import denoising_loss, flow_matching_loss
from sid.sampling import sample_teacher
from sid.schedules import sample_lognormal_sigma
from sid.teachers.diffusers_unet import load_diffusers_denoiser, save_teacher
from sid.trainer import (
    GracefulStop,
    TrainingInterrupted,
    crossed,
    out_of_memory_advice,
    sanitize_grads,
    step_seed,
    truncate_records,
)


def build_denoiser(cfg):
    """A randomly initialised UNet2DModel from ``cfg.unet``, EDM-preconditioned or (``objective: flow``) a
    velocity predictor under the rectified-flow rule."""
    try:
        return load_diffusers_denoiser(None, plain(cfg.unet), cfg.objective, cfg.sigma_data)[0]
    except (TypeError, ValueError) as e:
        raise SidError(f"unet config rejected by diffusers: {str(e).splitlines()[0][:200]}") from None


def train_teacher(cfg, resume: str | None = None):
    """Train until cfg.total_nimg images; returns (EMA denoiser, images seen)."""
    run_dir = Path(cfg.run_dir)
    check_fresh_start(run_dir, resume, key="run_dir")
    acc = Accelerator()
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    images = load_images(cfg.source)                                        # uint8 [N, C, H, W], in memory
    torch.manual_seed(cfg.seed)
    denoiser = build_denoiser(cfg)
    if tuple(images.shape[1:]) != (denoiser.net.unet.config.in_channels, *[denoiser.net.unet.config.sample_size] * 2):
        raise SidError(f"images are {tuple(images.shape[1:])}, the UNet expects in_channels × sample_size²")
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    ema = EMA(denoiser, cfg.ema_halflife_nimg, cfg.ema_rampup)
    nimg = step = 0
    seconds = 0.0                                                            # wall clock of earlier sessions
    path = resolve_resume(resume, run_dir) if resume else None
    if path is not None:
        state = load_training_state(path)
        restore(path, state, denoiser=denoiser, ema=ema.model, opt=opt)
        nimg, step, seconds = state["nimg"], state["step"], state.get("seconds", 0.0)
    if acc.is_main_process:
        truncate_records(run_dir / "metrics.jsonl", nimg)
    ema.to(acc.device)
    ddp, opt = acc.prepare(denoiser, opt)
    per_process = cfg.batch // acc.num_processes
    bf16 = cfg.precision == "bf16" and acc.device.type == "cuda"
    acc.print(f"teacher: {num_params(denoiser) / 1e6:.2f}M parameters, {len(images)} images of "
              f"{tuple(images.shape[1:])}")
    bar = tqdm(total=cfg.total_nimg, initial=nimg, unit="img", unit_scale=True, disable=not (acc.is_main_process
                                                                                             and cfg.progress))
    loss_sum, steps, t0 = torch.zeros((), device=acc.device), 0, time.time() - seconds
    stopped = False
    advice = f"at batch={per_process} per process: set a smaller batch"
    with GracefulStop() as stop, out_of_memory_advice(advice, run_dir):
        while nimg < cfg.total_nimg:
            torch.manual_seed(step_seed(cfg.seed, acc.process_index, step))
            x0 = images[torch.randint(len(images), (per_process,))].to(acc.device).float() / 127.5 - 1
            if cfg.xflip:
                x0 = torch.where(torch.rand(per_process, 1, 1, 1, device=acc.device) < 0.5, x0.flip(-1), x0)
            sigma = sample_lognormal_sigma(per_process, cfg.p_mean, cfg.p_std, device=acc.device)
            for group in opt.param_groups:                                   # linear warm-up
                group["lr"] = cfg.lr * min(1.0, (nimg + cfg.batch) / max(cfg.warmup_nimg, 1))
            with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=bf16):
                if cfg.objective == "flow":
                    loss = flow_matching_loss(ddp, x0, sigma).mean()
                else:
                    loss = denoising_loss(ddp, x0, sigma, sigma_data=cfg.sigma_data).mean()
            acc.backward(loss)
            sanitize_grads(denoiser)
            opt.step()
            opt.zero_grad(set_to_none=True)
            nimg, step = nimg + cfg.batch, step + 1
            ema.update(denoiser, nimg, cfg.batch)
            loss_sum, steps = loss_sum + loss.detach(), steps + 1

            done = nimg >= cfg.total_nimg
            at_log = crossed(nimg, cfg.batch, cfg.log_every_nimg) or done
            stopped = stop.agreed(acc, at_log) and not done                # a signal: checkpoint, then stop
            if at_log or stopped:
                mean_loss = float(acc.reduce(loss_sum, "mean")) / steps
                if acc.is_main_process:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"nimg": nimg, "step": step, "loss": mean_loss,
                                            "seconds": time.time() - t0}) + "\n")
                    bar.update(nimg - bar.n)
                    bar.set_postfix(loss=f"{mean_loss:.4g}")
                loss_sum, steps = torch.zeros((), device=acc.device), 0
            if acc.is_main_process and (crossed(nimg, cfg.batch, cfg.sample_every_nimg) or done):
                save_teacher_samples(ema.model, run_dir / "samples" / f"samples-{nimg:012d}.png", acc.device)
            if crossed(nimg, cfg.batch, cfg.ckpt_every_nimg) or done or stopped:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    state = {"nimg": nimg, "step": step, "seconds": time.time() - t0, "config": to_dict(cfg),
                             "denoiser": denoiser.state_dict(), "ema": ema.model.state_dict(),
                             "opt": opt.state_dict()}
                    save_training_state(run_dir, nimg, state, keep=cfg.keep_ckpts)
                    save_teacher(ema.model, run_dir / "teacher", torch.float16 if cfg.export_fp16 else None)
                acc.wait_for_everyone()
            if stopped:
                break
    bar.close()
    if stopped:
        raise TrainingInterrupted(f"interrupted at {nimg:,} images, checkpointed in {run_dir}")
    return ema.model, nimg


def save_teacher_samples(denoiser, path: Path, device, num: int = 64, steps: int = 18) -> None:
    """Heun samples (35 evaluations) of the EMA teacher at seeds 0..num-1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (denoiser.net.unet.config.in_channels, *[denoiser.net.unet.config.sample_size] * 2)
    save_image_grid(sample_teacher(denoiser, shape, steps, "heun", range(num), device=device), path)
