"""Training throughput: the real SiD iteration (sid/trainer.py: iteration) timed under a ladder of speed settings.

    python -m eval.bench_speed --config speed/cifar_unet --out runs/bench_speed
    python -m eval.bench_speed --config speed/cifar_unet --modes reference,fast --iters 20

Each mode adds one setting to the one before it, so each row shows what that setting gains. Model FLOPs are
counted once per network by ``torch.utils.flop_counter`` on one real eager iteration (matmuls, convolutions and
attention, forward and backward), and the peak is measured, not quoted: a large bf16 matmul on GPUs (fp32 on
CPUs). Writes bench.json and bench.md to --out, and prints the table.
"""

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from sid.config import load_config
from sid.errors import SidError

# The reference code's settings: fp32 without TF32, eager, PyTorch's default Adam, the batch in 4 passes
# (its 256 as 4 × 64).
REFERENCE = ["train.precision=fp32", "perf.tf32=false", "perf.fused_adam=false", "perf.teacher_bf16=false",
             "perf.channels_last=false", "perf.compile=false", "perf.grad_checkpointing=false"]
REFERENCE_PASSES = 4
# Each mode: the one before it plus one change.
LADDER = {
    "reference": [],
    "no_accumulation": ["optim.batch_gpu=null"],
    "tf32": ["perf.tf32=true"],
    "bf16": ["train.precision=bf16"],
    "fused_adam": ["perf.fused_adam=true"],
    "teacher_bf16": ["perf.teacher_bf16=true"],
    "channels_last": ["perf.channels_last=true"],
    "compile": ["perf.compile=true"],
}
# Named shortcuts outside the ladder.
ALIASES = {"fast": "compile"}


def mode_overrides(mode: str, batch: int) -> list[str]:
    """The overrides of ``mode`` for a global ``batch``: the reference settings, then every ladder step up to
    and including it."""
    mode = ALIASES.get(mode, mode)
    if mode not in LADDER:
        raise SidError(f"unknown mode {mode!r}; choose from {', '.join([*LADDER, *ALIASES])}")
    if batch % REFERENCE_PASSES:
        raise SidError(f"optim.batch={batch} must be divisible by {REFERENCE_PASSES} (the reference mode's passes)")
    names = list(LADDER)
    steps = [o for name in names[: names.index(mode) + 1] for o in LADDER[name]]
    return [*REFERENCE, f"optim.batch_gpu={batch // REFERENCE_PASSES}", *steps]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, seconds: float = 2.0) -> tuple[float, str]:
    """Measured dense-matmul rate in FLOP/s: bf16 8192² on GPUs, fp32 2048² on CPUs."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        reps += 10
        synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start), f"{str(dtype).removeprefix('torch.')} matmul {n}²"


def count_flops(fn) -> int:
    """Model FLOPs of one call of ``fn`` (torch.utils.flop_counter: matmul, convolution, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build_run(cfg):
    """A training run of ``cfg`` in this process (one device), as the trainer builds it."""
    from accelerate import Accelerator

    from sid.run import build

    return build(cfg, Accelerator(), resume=None)


def network_flops(config_files: list[str], overrides: list[str]) -> dict:
    """FLOPs per image of one training iteration and of one teacher forward, counted eagerly in fp32."""
    from sid.trainer import iteration

    eager = ["perf.compile=false", "perf.grad_checkpointing=false", "train.precision=fp32"]
    cfg = load_config(config_files, overrides + eager)
    run = build_run(cfg)
    if cfg.loss.reuse_generator_batch:
        iteration(run)                          # its first iteration has one more fake-score step than the rest
    per_iteration = count_flops(lambda: iteration(run)) / cfg.optim.batch
    z, labels = run.generator.random_inputs(1, run.accelerator.device)
    with torch.no_grad():
        forward = count_flops(lambda: run.teacher.denoiser(z, torch.ones(1, device=z.device), labels))
    return {"params": sum(p.numel() for p in run.teacher.denoiser.parameters()),
            "forward_flop": forward, "iteration_flop_per_img": per_iteration}


def time_mode(cfg, warmup: int, iters: int) -> dict:
    """Images/s of ``iters`` iterations after ``warmup`` (which absorbs compilation), and peak memory."""
    from sid.trainer import iteration

    run = build_run(cfg)
    device = run.accelerator.device
    step = partial(iteration, run)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        losses = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    finite = all(bool(torch.as_tensor(v).isfinite().all()) for v in losses[:2])
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del run, step
    return {"img_per_s": iters * cfg.optim.batch / seconds, "step_s": seconds / iters,
            "warmup_extra_s": warm - warmup * seconds / iters, "peak_mem_gib": memory, "finite": finite}


def release() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_row(mode: str, cfg, flops: dict, peak: float, warmup: int, iters: int) -> dict:
    """One row of the table: ``time_mode`` of ``cfg``, its model TFLOP/s and share of the measured peak."""
    result = time_mode(cfg, warmup, iters)
    achieved = result["img_per_s"] * flops["iteration_flop_per_img"]
    release()
    return {"mode": mode, "batch": cfg.optim.batch, "batch_gpu": cfg.optim.batch_gpu, **result,
            "tflop_s": achieved / 1e12, "peak_fraction": achieved / peak}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"


def benchmark(config_files: list[str], overrides: list[str], modes: list[str], warmup: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"train.run_dir={tmp}", "train.progress=false", "train.tracker=none"]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        peak, peak_what = matmul_peak(device)
        flops = network_flops(config_files, overrides + common)
        release()
        rows = []
        for mode in modes:
            batch = load_config(config_files, overrides).optim.batch
            mode_cfg = load_config(config_files, mode_overrides(mode, batch) + overrides + common)
            rows.append(measure_row(mode, mode_cfg, flops, peak, warmup, iters))
    return {"config": config_files, "overrides": overrides, "device": device_name(device), "torch": torch.__version__,
            "peak_tflop_s": peak / 1e12, "peak_measured_with": peak_what, **flops, "rows": rows,
            "date": time.strftime("%Y-%m-%d")}


def markdown(result: dict) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, {result['date']}; teacher {result['params'] / 1e6:.1f}M "
        f"parameters, {result['forward_flop'] / 1e9:.2f} GFLOP per image forward, "
        f"{result['iteration_flop_per_img'] / 1e9:.2f} GFLOP per image per training iteration "
        f"({result['iteration_flop_per_img'] / result['forward_flop']:.1f} forwards); measured peak "
        f"{result['peak_tflop_s']:.1f} TFLOP/s ({result['peak_measured_with']}).",
        "",
        f"| mode | batch (per pass) | images/s | × {result['rows'][0]['mode']} | TFLOP/s | % of peak | peak memory "
        "| warm-up extra |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = result["rows"][0]["img_per_s"]
    for r in result["rows"]:
        memory = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        per_pass = r["batch_gpu"] or r["batch"]
        lines.append(f"| {r['mode']}{'' if r['finite'] else ' (non-finite!)'} | {r['batch']} ({per_pass}) | "
                     f"{r['img_per_s']:.1f} | {r['img_per_s'] / base:.2f} | {r['tflop_s']:.3g} | "
                     f"{100 * r['peak_fraction']:.1f} | {memory} | {r['warmup_extra_s']:.1f} s |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML preset(s) naming the teacher")
    parser.add_argument("--modes", default=",".join(LADDER), help=f"comma list from {', '.join([*LADDER, *ALIASES])}")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compilation happens here)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations")
    parser.add_argument("--out", default=None, help="folder for bench.json and bench.md")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.batch=128")
    args = parser.parse_args(argv)
    try:
        modes = [m for m in args.modes.split(",") if m]
        batch = load_config(args.config, args.overrides).optim.batch
        for mode in modes:
            mode_overrides(mode, batch)
        result = benchmark(args.config, args.overrides, modes, args.warmup, args.iters)
    except SidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(result)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=1))
        (out / "bench.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
