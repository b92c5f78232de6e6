"""Maintenance of a distillation run, between iterations: checkpoints and exports, sample grids, in-loop evaluation,
and the tracker. The main process writes; collectives (a sharded run's gathered networks) run on every process.
Nothing here changes what is trained."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import accelerate.tracking
import numpy as np
import torch
from PIL import Image

from sid.checkpoint import Owned, all_finite, save_training_state
from sid.config import as_tuple, to_dict
from sid.errors import SidError, described
from sid.generator import OneStepGenerator, export_generator, note_measured
from sid.images import image_grid, save_image_grid, save_panels, save_samples
from sid.lora import is_lora, merged, save_adapter
from sid.metrics import (
    generator_fid,
    load_reference,
    make_clip,
    make_fid,
    prompt_fid,
    sliced_wasserstein,
    text_sampler,
)
from sid.prompt_sources import read_prompts
from sid.run import Run, kind_of
from sid.runtime import MetricsLogger, NonFiniteGuard, any_process, best_record
from sid.sampling import sample_teacher
from sid.sharding import full_state, loaded

# The trackers of Accelerate that take pictures, and the form each takes one in: a batch (NHWC), one image, a list.
PICTURE_FORMS = {"tensorboard": "batch", "aim": "image", "clearml": "image", "wandb": "list", "swanlab": "list"}
# Where "pip install" finds each tracker, where the name differs.
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


def choose_tracker(name: str) -> tuple[str | None, str | None]:
    """``train.tracker`` as Accelerate's ``log_with``, and a line to print: ``auto`` is TensorBoard where it is
    installed (else none, said once); a named tracker that is not installed is one error line (Accelerate would
    drop it without a word)."""
    available = {str(t) for t in accelerate.tracking.get_available_trackers()}
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


def build_evaluator(run: Run):
    """In-loop quality of the EMA generator on cfg.eval.num samples at fixed seeds, by the main process:
    proxy FID against reference statistics for image teachers, the sliced Wasserstein distance to exact
    samples for teachers that have them. Returns a function giving ``{"fid": v}`` or ``{"swd": v}``.

    Each value better than every earlier one of the run (lower; read back from metrics.jsonl when resuming)
    also exports the EMA generator to ``generator-best/``: SiD's results are the best snapshot of a run. With
    several EMAs each is measured (``fid_ema-<h>``, ``swd_ema-<h>`` beside the main one's) and the best of all of
    them is ``generator-best/``."""
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

    def named(key: str, ema) -> str:                            # the main EMA's fid; fid_ema-<h> of the others
        return key if ema.main else f"{key}_{ema.name}"

    best = min(best_record(Path(cfg.train.run_dir) / "metrics.jsonl", named(name, ema)) for ema in run.emas)

    def evaluate():
        nonlocal best
        result = {}
        for ema in run.emas:
            generator = ema_generator(run, ema)                 # a sharded run's: gathered (every process)
            measured = measure(generator) if acc.is_main_process else {}
            measured = measured if isinstance(measured, dict) else {name: measured}
            value = measured.get(name, math.nan)
            result.update({named(k, ema): v for k, v in measured.items()})
            if measured and value < best:                       # NaN is never better
                best = value
                halflife = {"ema_halflife_nimg": ema.halflife_nimg} if run.more_emas else {}
                export(run, "generator-best", generator, **measured, **halflife)
            if measured:                                        # the export of this step, if any, names it too
                note_measured(Path(cfg.train.run_dir) / export_folder(ema), run.nimg, measured)
        acc.wait_for_everyone()
        return result

    return evaluate


def draw_samples(run: Run) -> None:
    """``save_sample_grid``, where a failure (a teacher whose samples cannot be drawn) is one warning line: the
    checkpoint is already written, and training goes on."""
    try:
        save_sample_grid(run)
    except Exception as e:                                # pictures are never worth the run
        print(f"warning: no sample grid at {run.nimg:,} images ({described(e, 200)}); training goes on",
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
    n = 2000 if teacher.points else cfg.train.num_samples
    cond = run.conditions.grid(n, device)
    teacher_png = folder / "teacher.png"
    reference = None
    if run.sharded and any_process(acc.is_main_process and not teacher_png.is_file(), acc):
        reference = teacher_reference(run, n, cond)             # the sharded teacher: on every process
    if not acc.is_main_process:
        return
    folder.mkdir(exist_ok=True)
    path = folder / f"samples-{run.nimg:012d}.png"
    x = teacher.decode(generator.sample_seeds(range(n), device=device, cond=cond))
    if teacher.points:                                          # a scatter over the teacher's samples
        if teacher.exact_samples:
            reference = teacher.sample(2000, torch.Generator().manual_seed(0))
        else:
            with run.autocast(), torch.compiler.set_stance("force_eager"):
                reference = sample_teacher(teacher.denoiser, teacher.shape, 18, "heun", range(2000), device=device,
                                           sigmas=teacher.sampling_sigmas(18))
        save_samples(x, path, reference, title=f"{run.nimg} images, lam={cfg.loss.lam}")
        log_picture(run, "samples", path)
        return
    if not save_samples(x, path):                               # neither images nor 2-D points: nothing to draw
        return
    if not teacher_png.is_file():
        reference = reference if reference is not None else teacher_reference(run, n, cond)
        save_image_grid(teacher.decode(reference), teacher_png)
        if prompts := run.conditions.grid_prompts(n):
            (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    guided = f", κ = {run.loss.guide_teacher:g}" if run.loss.guide_teacher != 1 else ""
    save_panels([(image_grid(x), f"{kind_of(run.generator)} generator, {run.nimg:,} images, λ={run.loss.lam:g}"),
                 (np.asarray(Image.open(teacher_png)), f"teacher, Heun, 35 evaluations{guided}")],
                folder / "compare.png")
    log_picture(run, "samples", folder / "compare.png")


def teacher_reference(run: Run, n: int, cond) -> torch.Tensor:
    """The teacher's Heun samples (35 evaluations) at seeds 0..n-1, under the loss's teacher guidance: the grids'
    reference, drawn once, eagerly (not worth a compile)."""
    teacher = run.teacher
    with run.autocast(), torch.compiler.set_stance("force_eager"):
        return sample_teacher(teacher.denoiser, teacher.shape, 18, "heun", range(n), device=run.accelerator.device,
                              cond=cond, guidance=run.loss.guide_teacher, guide=teacher.guide,
                              sigmas=teacher.sampling_sigmas(18))


def save_checkpoint(run: Run, logger: MetricsLogger, guard: NonFiniteGuard) -> None:
    """Training state (resumable: with the unfinished log interval's sums and the NaN guard's streak) and the
    exported EMA generator (the deliverable), by the main process; a sharded run's networks are gathered for it
    first. Weights that are not finite are not saved (one line): the states already written stay the last good
    ones."""
    acc = run.accelerator
    metrics, nonfinite = logger.state_dict(), guard.state_dict()      # collectives: on every process
    states = network_states(run)                                     # collectives when sharded
    # A sharded LoRA EMA's state holds its adapters alone: its export gathers the whole network (a collective too).
    wholes = [ema_generator(run, e) for e in run.emas] if run.sharded and run.cfg.lora.generator else None
    acc.wait_for_everyone()
    if acc.is_main_process:
        if not all_finite(*(states[k] for k in ("fake_score", "generator", *(e.name for e in run.emas)))):
            print(f"warning: no training state at {run.nimg:,} images: the weights hold NaN or inf; the states "
                  f"already in {run.cfg.train.run_dir} stay the last finite ones", file=sys.stderr, flush=True)
        else:
            state = {"nimg": run.nimg, "step": run.step, "seconds": logger.elapsed(), "config": to_dict(run.cfg),
                     **states, "metrics": metrics, "nonfinite": nonfinite, "conditions": run.conditions.state_dict(),
                     **({"real_images": run.real.state_dict()} if run.real is not None else {})}
            save_training_state(run.cfg.train.run_dir, run.nimg, state, keep=run.cfg.train.keep_ckpts)
            for i, ema in enumerate(run.emas):          # the main EMA is generator/, each further one its own
                whole = plain_generator(run, states[ema.name], ema) if wholes is None else wholes[i]
                export(run, export_folder(ema), whole, **({"ema_halflife_nimg": ema.halflife_nimg} if i else {}))
    acc.wait_for_everyone()


def network_states(run: Run) -> dict:
    """What a training state holds of the networks and optimisers: the students' own tensors (a LoRA student's
    adapters), the EMA's, Adam's moments by parameter index; a sharded run's gathered whole for the main process
    (a collective: every process calls it; the others get empty states)."""
    states = {"fake_score": Owned(run.fake_score, run.shared).state_dict(),
              "generator": Owned(run.generator, run.shared).state_dict(),
              **{e.name: Owned(e.model, run.shared).state_dict() for e in run.emas},
              "opt_fake": run.opt_fake.state_dict(), "opt_g": run.opt_g.state_dict()}
    if run.sharded:
        states = {name: full_state(state, run.accelerator.is_main_process) for name, state in states.items()}
    return states


def export_folder(ema) -> str:
    """Where an EMA is exported: ``generator`` (the main one), ``generator-ema-<half-life>`` (the others)."""
    return "generator" if ema.main else f"generator-{ema.name}"


def ema_generator(run: Run, ema=None) -> OneStepGenerator | None:
    """An EMA generator (the main one, or ``ema``) as one module: itself, or for a sharded run a copy gathered
    whole on the main process (a collective: every process calls it; None off the main process)."""
    ema = ema or run.ema
    if not run.sharded:
        return ema.model
    return plain_generator(run, full_state(ema.model.state_dict(), run.accelerator.is_main_process), ema)


def plain_generator(run: Run, state: dict, ema=None) -> OneStepGenerator | None:
    """The EMA generator of a gathered ``state`` (sharded runs; on the main process), else the EMA itself."""
    if not run.sharded:
        return (ema or run.ema).model
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
