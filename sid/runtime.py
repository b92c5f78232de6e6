"""What both trainers (distillation and teacher training) run on: signals, deadlines, per-step seeds, collectives,
the NaN policy, out-of-memory advice and the metrics file.

None of it knows what is trained. Collectives take the ``accelerate.Accelerator`` of the run; this module does not
import Accelerate.
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
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sid.errors import SidError


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


def precision_policy(precision: str, accelerator) -> tuple[bool, str]:
    """``train.precision`` reconciled with Accelerate's mixed precision (``accelerate launch --mixed_precision``
    or its config file): (bf16, where that came from), never a mixture of the two.

    sid has two modes: every network forward under one bf16 autocast with fp32 masters, or fp32 throughout.
    Accelerate's ``bf16`` is the first (``auto`` or ``bf16`` follow it); with ``train.precision=fp32`` the pair
    contradicts itself, and ``fp16``/``fp8`` (loss scaling, other kernels) are neither: each is one line.
    """
    launched = str(getattr(accelerator, "mixed_precision", "no") or "no")
    if launched == "no":
        return use_bf16(precision, accelerator.device), f"train.precision={precision}"
    if launched == "bf16" and precision != "fp32":
        return True, "accelerate's mixed_precision=bf16"
    if launched == "bf16":
        raise SidError("accelerate's mixed_precision=bf16 contradicts train.precision=fp32: launch with "
                       "--mixed_precision no (or set mixed_precision: 'no' in its config file) to train in fp32, "
                       "or drop train.precision=fp32")
    raise SidError(f"accelerate's mixed_precision={launched} is not one of sid's modes (bf16 autocast with fp32 "
                   "masters, or fp32): launch with --mixed_precision bf16 or no, or set it so in accelerate's config "
                   "file")


def check_launch(accelerator, environ=None) -> str | None:
    """Whether the launcher started the processes Accelerate joined: one line (a warning to print) when it asked
    for several processes and one runs, an error when several processes run, each alone."""
    environ = os.environ if environ is None else environ
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise SidError(f"the launcher started {world} processes, but Accelerate joined none of them (no GPU "
                       "visible): for CPU processes set ACCELERATE_USE_CPU=1, e.g. ACCELERATE_USE_CPU=1 accelerate "
                       f"launch --multi_gpu --num_processes {world} train.py ...")
    if accelerator.num_processes == 1 and "MASTER_ADDR" in environ and "ACCELERATE_MIXED_PRECISION" in environ:
        return ("warning: accelerate launch was asked for several processes, but one runs (a MULTI_CPU config "
                "starts them through mpirun only, given mpirun_hostfile); on one machine: ACCELERATE_USE_CPU=1 "
                "accelerate launch --multi_gpu --num_processes 2 train.py ... (or torchrun --nproc_per_node 2)")
    return None


def crossed(nimg: int, batch: int, every: int) -> bool:
    """Whether the last step carried the image counter across a multiple of ``every``."""
    return nimg // every != (nimg - batch) // every


def any_process(flag: bool, accelerator) -> bool:
    """Whether ``flag`` holds on any process (a collective: every process calls it at the same step)."""
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max"))


def past(deadline: float, accelerator) -> bool:
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

    def agreed(self, accelerator, sync_point: bool) -> bool:
        """Whether all processes stop after this step: checked every step in one process; with several, at
        ``sync_point`` steps (log intervals) only, where one collective makes them agree."""
        if accelerator.num_processes == 1:
            return self.requested
        return sync_point and any_process(self.requested, accelerator)


@contextlib.contextmanager
def out_of_memory_advice(advice: str, run_dir: Path):
    """An out-of-memory error, CUDA's or the CPU allocator's, becomes one line saying what to lower (``advice``);
    the checkpoints already written stay, so the run resumes with the smaller setting."""
    try:
        yield
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        cpu = re.search(r"DefaultCPUAllocator: (?:not enough memory|can't allocate memory): you tried to allocate "
                        r"(\d+) bytes", str(e))
        if not isinstance(e, torch.cuda.OutOfMemoryError) and cpu is None:
            raise
        asked = re.search(r"Tried to allocate ([\d.]+ \w+)", str(e))
        size = ""
        if asked or cpu:
            size = f" (tried to allocate {asked[1] if asked else f'{int(cpu[1]) / 2**30:,.1f} GiB'})"
        raise SidError(f"out of {'CPU' if cpu else 'GPU'} memory{size} {advice}; the checkpoints already in {run_dir} "
                       "are kept (--resume)") from None


# The NaN policy of the official code (SiD, training/sid_loss.py and the loop): per step, samples whose loss is
# not finite are dropped and gradients pass through nan_to_num; across steps, a run of non-finite steps aborts.

def keep_finite(per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop samples whose loss is not finite; returns (losses, number dropped)."""
    finite = per_sample.isfinite()
    return torch.where(finite, per_sample, torch.zeros_like(per_sample)), (~finite).sum()


def sanitize_grads(module: torch.nn.Module) -> torch.Tensor:
    """nan_to_num on every gradient (nan -> 0, ±inf -> ±1e5); returns whether any was non-finite.

    The check is one foreach norm: a NaN or ±inf anywhere makes the total norm non-finite.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    bad = torch.nn.utils.get_total_norm(grads).isfinite().logical_not()
    if isinstance(bad, DTensor):                       # sharded gradients: the norm of them all, on every process
        bad = bad.full_tensor()
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    return bad


class NonFiniteGuard:
    """Consecutive steps with non-finite values, counted on the device; ``check`` (a host sync, at log intervals
    and checkpoints) stops the run with one line once a streak reaches ``limit``, the checkpoints kept."""

    def __init__(self, limit: int, device: torch.device, run_dir):
        self.limit, self.run_dir = limit, run_dir
        self.streak = torch.zeros((), device=device, dtype=torch.long)
        self.worst = torch.zeros((), device=device, dtype=torch.long)

    def update(self, bad: torch.Tensor) -> None:
        self.streak = (self.streak + 1) * bad
        self.worst = torch.maximum(self.worst, self.streak)

    def state_dict(self) -> dict:
        return {"streak": self.streak.clone(), "worst": self.worst.clone()}

    def load_state_dict(self, state: dict | None) -> None:
        """A resumed run's streak goes on where it stopped (``None``: states from before it was kept)."""
        if state:
            self.streak = state["streak"].to(self.streak).reshape(())
            self.worst = state["worst"].to(self.worst).reshape(())

    def check(self, accelerator) -> None:
        worst = int(accelerator.gather(self.worst[None]).max())
        if worst >= self.limit:
            raise SidError(
                f"aborting: {worst} consecutive steps had non-finite losses or gradients "
                f"(train.max_nonfinite_steps={self.limit}); checkpoints already in {self.run_dir} are kept. "
                "Lower optim.g_lr / optim.fake_lr, or use train.precision=fp32"
            )


class MetricsLogger:
    """Per-step values summed on the device, and every log interval reduced across processes and written, with
    the images, step, throughput and wall-clock seconds, to ``metrics.jsonl`` (and the tracker); the progress bar.

    ``reductions`` names the per-step values and how an interval reports each: ``mean`` over steps and
    processes (losses), ``sum`` over steps and processes (samples dropped), ``steps``: a per-step flag counted
    over the interval's steps, averaged over processes (steps with non-finite values).
    """

    def __init__(self, accelerator, run_dir, reductions: dict[str, str], nimg: int = 0, seconds: float = 0.0, *,
                 total_nimg: int, time_budget: float = 0, tracker: bool = False, progress: bool = True):
        """Starts at image ``nimg`` after ``seconds`` of earlier sessions (a resumed run)."""
        self.acc, self.reductions, self.tracker = accelerator, dict(reductions), tracker
        self.path = Path(run_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            truncate_records(self.path, nimg)
        self.sums = torch.zeros(len(self.reductions) + 1, device=accelerator.device)     # ..., steps
        now = time.time()
        self.start_time, self.last_time, self.last_nimg = now - seconds, now, nimg
        self.session_start, self.time_budget, self.total_nimg = now, time_budget, total_nimg
        # With a time budget the run usually ends on the clock: the bar then counts this session's seconds against
        # the budget (its percentage and ETA), the images in its postfix; else images against train.total_nimg.
        self.bar = tqdm(total=time_budget or total_nimg, initial=0 if time_budget else min(nimg, total_nimg),
                        unit="s" if time_budget else "img", unit_scale=not time_budget, desc=self.desc,
                        dynamic_ncols=True, disable=not (accelerator.is_main_process and progress),
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{remaining} left{postfix}]"
                        if time_budget else None)
        self.postfix: dict = {}

    @property
    def desc(self) -> str:
        return f"training, {self.time_budget:g} s budget" if self.time_budget else "training"

    def tick(self, nimg: int) -> None:
        """Move the bar after a step (images or seconds; no host sync: tqdm redraws at most a few times a second)."""
        if self.bar.disable:
            return
        if self.time_budget:
            self.bar.n = min(time.time() - self.session_start, self.time_budget)
            self.postfix["img"] = f"{nimg:,}"
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(0)
        else:
            self.bar.update(min(nimg, self.total_nimg) - self.bar.n)

    @contextlib.contextmanager
    def doing(self, what: str):
        """Say on the bar what the run is doing between steps (drawing sample grids, measuring FID, saving)."""
        if not self.bar.disable:
            self.bar.set_description_str(f"{what}...", refresh=True)
        try:
            yield
        finally:
            if not self.bar.disable:
                self.bar.set_description_str(self.desc, refresh=True)

    def add(self, **values: torch.Tensor) -> None:
        """One step's values (device tensors or numbers, the keys of ``reductions``); no host sync."""
        step = [torch.as_tensor(values[k], device=self.sums.device).float() for k in self.reductions]
        self.sums += torch.stack([*step, torch.ones((), device=self.sums.device)])

    def state_dict(self) -> dict:
        """The unfinished interval's sums, over all processes (a collective), so that a resumed run writes the
        record an uninterrupted one would."""
        return {"keys": list(self.reductions), "sums": self.acc.reduce(self.sums.clone(), "sum").cpu()}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the interval's sums on the main process (the others start from zero: the next flush sums
        them); ``None`` or other keys (a state from before, or of another run) leave the sums at zero."""
        if state and state.get("keys") == list(self.reductions) and self.acc.is_main_process:
            self.sums = state["sums"].to(self.sums).reshape(self.sums.shape)

    def flush(self, nimg: int, step: int, **extra) -> dict:
        """Write the interval's record (with ``extra`` fields) and start the next interval."""
        sums = self.acc.reduce(self.sums.clone(), "sum").tolist()
        steps, processes = max(sums[-1], 1), self.acc.num_processes
        now = time.time()
        record = {"nimg": nimg, "step": step}
        for (key, how), total in zip(self.reductions.items(), sums):          # a diverged mean stays ±inf
            record[key] = total / steps if how == "mean" else int(total if how == "sum" else total / processes)
        record.update({"img_per_s": (nimg - self.last_nimg) / max(now - self.last_time, 1e-9),
                       "seconds": now - self.start_time, **extra})
        self.sums.zero_()
        self.write(record)
        if self.acc.is_main_process:
            self.postfix = {k: f"{record[k]:.4g}" for k, how in self.reductions.items() if how == "mean"}
            self.postfix["img/s"] = f"{record['img_per_s']:.3g}"
            self.tick(nimg)
            self.bar.set_postfix(self.postfix)
        self.last_time, self.last_nimg = now, nimg
        return record

    def write(self, record: dict) -> None:
        """One record (losses, or FID) to metrics.jsonl and the tracker, from the main process."""
        if self.acc.is_main_process:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:                 # a full disk: say so; the checkpoints already written stay
                raise SidError(f"could not append to {self.path} ({e.strerror or e}); the checkpoints already in "
                               f"{self.path.parent} are kept: free space and resume") from None
            if self.tracker:
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
        try:
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise SidError(f"could not rewrite {path} ({e.strerror or e}); free space and start again") from None


def best_record(path: Path, name: str) -> float:
    """The lowest finite value of ``name`` among the records of ``path`` (JSONL); inf if none."""
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return min((r[name] for r in records if math.isfinite(r.get(name, math.inf))), default=math.inf)
