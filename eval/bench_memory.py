"""Peak memory per configuration against the memory plan (sid/memory.py): what a real training run holds beside what
``sid train --dry-run`` predicts, configuration by configuration.

    python -m eval.bench_memory --config fmnist --out runs/bench_memory        # GPU: torch.cuda's peak
    python -m eval.bench_memory --smoke --out runs/bench_memory                # tiny UNet on the CPU (the suite's)
    ACCELERATE_USE_CPU=1 ACCELERATE_USE_FSDP=true FSDP_VERSION=2 accelerate launch --multi_gpu --num_processes 2 \
        -m eval.bench_memory --smoke --cases "as configured,activation checkpointing"      # sharded over two

Each row is the config plus one change: as configured, activation checkpointing, LoRA students, both. The run is
built (``sid.run.build``) and takes two iterations; measured are the bytes held after the build (the weights:
teacher, codec, students, EMA), after the iterations (+ Adam's moments) and at the peak (+ gradients and
activations). On a GPU they are ``torch.cuda``'s allocated bytes; on the CPU the tensors' bytes as the plan's own
tracker counts them (``sid.memory.PeakBytes``): allocator slack is in neither. The planned columns are the plan's
rows summed the same way. Writes memory.json and memory.md to --out and prints the table.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from sid.config import load_config
from sid.errors import SidError

CASES = {
    "as configured": [],
    "activation checkpointing": ["perf.grad_checkpointing=true"],
    "LoRA students": ["lora.fake_score=true", "lora.generator=true"],
    "LoRA + checkpointing": ["lora.fake_score=true", "lora.generator=true", "perf.grad_checkpointing=true"],
}
# A tiny diffusers UNet with attention (LoRA's targets), batch 16, fp32 and bf16: the CPU smoke run.
SMOKE_UNET = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": [32, 64], "norm_num_groups": 8, "attention_head_dim": 8,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
SMOKE = ["teacher.kind=diffusers", f"teacher.diffusers.unet_config={json.dumps(SMOKE_UNET).replace(' ', '')}",
         "teacher.diffusers.prediction_type=edm", "optim.batch=16", "train.progress=false", "train.tracker=none",
         "lora.rank=8"]
WEIGHTS = ("teacher", "VAE", "fake score: weights", "fake score: adapters", "generator: weights",
           "generator: adapters", "generator: EMA")


def measure(cfg) -> dict:
    """Bytes held after the build, after two iterations, and at the peak of those iterations, of a real run of
    ``cfg`` on this process (under a launch of several: the largest over the processes)."""
    from accelerate import Accelerator

    from sid.memory import PeakBytes
    from sid.run import build
    from sid.trainer import iteration

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
    tracker = PeakBytes(devices=("cpu",))
    with tracker if not gpu else _nothing():
        accelerator = Accelerator(cpu=not gpu)
        run = build(cfg, accelerator, resume=None)
        weights = torch.cuda.memory_allocated() - start if gpu else tracker.live
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        tracker.peak = tracker.live                 # the iterations' peak (a sharded build first holds it whole)
        for _ in range(2):
            iteration(run)
        states = torch.cuda.memory_allocated() - start if gpu else tracker.live
    peak = torch.cuda.max_memory_allocated() - start if gpu else tracker.peak
    measured = torch.tensor([weights, states, peak], dtype=torch.float64, device=accelerator.device)
    measured = accelerator.reduce(measured, reduction="max") if accelerator.num_processes > 1 else measured
    del run
    return dict(zip(("weights", "states", "peak"), measured.tolist()))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def planned(cfg) -> dict:
    """The plan's rows summed as ``measure`` measures: weights, + Adam's moments, everything; for the launch this
    runs under (its processes, and sharded where it is an FSDP launch)."""
    import os

    from sid.memory import plan

    processes = int(os.environ.get("WORLD_SIZE", 1))
    sharded = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    result = plan(cfg, processes, sharded, on_gpu=torch.cuda.is_available())
    weights = sum(b for what, b in result.rows if what.startswith(WEIGHTS))
    moments = sum(b for what, b in result.rows if "Adam" in what)
    return {"weights": weights, "states": weights + moments, "peak": result.total}


def bench(configs: list[str], overrides: list[str], cases: dict, precisions: list[str]) -> list[dict]:
    rows = []
    for precision in precisions:
        for name, extra in cases.items():
            with tempfile.TemporaryDirectory() as run_dir:
                cfg = load_config(configs, [*overrides, f"train.precision={precision}", *extra,
                                            f"train.run_dir={run_dir}"])
                torch.manual_seed(0)
                rows.append({"case": name, "precision": precision, "measured": measure(cfg),
                             "planned": planned(cfg)})
    return rows


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["| configuration | precision | weights MiB (measured / planned) | + Adam MiB | peak MiB | peak: plan / "
             "measured |", "|---|---|---|---|---|---|"]
    for r in rows:
        m, p = r["measured"], r["planned"]
        cells = " | ".join(f"{m[k] / mib:.1f} / {p[k] / mib:.1f}" for k in ("weights", "states", "peak"))
        lines.append(f"| {r['case']} | {r['precision']} | {cells} | {p['peak'] / m['peak']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="config file or preset (repeatable)")
    p.add_argument("--smoke", action="store_true", help="the tiny UNet on the CPU, fp32 and bf16")
    p.add_argument("--precision", default=None, help="fp32 and/or bf16, comma-separated (default: bf16 on GPUs, "
                                                     "fp32 on CPUs; --smoke: both)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--out", default="runs/bench_memory")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        overrides = [*(SMOKE if args.smoke else []), *args.overrides]
        default = "fp32,bf16" if args.smoke else ("bf16" if torch.cuda.is_available() else "fp32")
        cases = {name: CASES[name] for name in args.cases.split(",")}
        rows = bench(args.config, overrides, cases, (args.precision or default).split(","))
    except SidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)):                 # one writer under a launch of several processes
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        sharded = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
        device += f", {world} processes{', sharded' if sharded else ''}, per process (the largest)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    command = " ".join(["python -m eval.bench_memory", *(argv or sys.argv[1:])])
    text = f"Peak memory, measured and planned ({device}; `{command}`)"
    (out / "memory.md").write_text(f"{text}\n\n{table(rows)}\n")
    print(f"{text}\n\n{table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
