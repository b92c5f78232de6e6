"""The GPU measurements in two commands, each within its own time budget (it stops at --budget seconds and
writes what it measured so far), each with a --smoke mode that runs the same code paths on a CPU in under a
minute with tiny sizes (tests/test_gpu_check.py runs it, so the GPU run cannot die on a typo).

On the GPU machine, which has no network: here, `bash ../shared/tools/prepare_device_carry.sh` builds the
ignored folders .whl/ (diffusers, omegaconf), .data/ (Fashion-MNIST) and .inc/ (the Inception file, fp16);
the repository (about 9 MB) and .whl/ + .data/fashion-mnist-test/ + .inc/ (53 MB) fit the 64 MiB that travel.
Command A, with carry [".whl"] (at most 9 minutes):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD python3 -m eval.gpu_check speed --out $OUT/speed --budget 480

Command B, with carry [".whl", ".data/fashion-mnist-test", ".inc"] (at most 9 minutes):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD SID_FASHION_MNIST=$PWD/.data/fashion-mnist-test python3 -m eval.gpu_check quality \
        --out $OUT/quality --weights .inc/inception-2015-12-05-fp16.pt --budget 480

Command C, the family ranked (issue: DMD, SiDA and SIM beside SiD), the same carry plus a 12,000-image share of
the training set as SiDA's real images, made here (4 MB, so that all travels within 64 MiB) with
``python3 -c "import numpy as np; from sid.data import fashion_mnist; np.savez_compressed('.data/fmnist-train-12k.npz',
images=fashion_mnist('train')[:12000].permute(0, 2, 3, 1).numpy())"``, carry [".whl", ".data/fashion-mnist-test",
".data/fmnist-train-12k.npz", ".inc"] (at most 9 minutes; five members of 75 s each and their FIDs):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD SID_FASHION_MNIST=$PWD/.data/fashion-mnist-test python3 -m eval.gpu_check quality \
        --out $OUT/members --weights .inc/inception-2015-12-05-fp16.pt --budget 480 --seconds 75 \
        --members sid,fgm,dmd,sim,sida --real .data/fmnist-train-12k.npz

``speed``: the GPU tests (tests/test_speed.py -k gpu), then the speed ladder of eval/bench_speed.py on
``speed/cifar_unet`` (reference settings, bf16, fused Adam, bf16 teacher, torch.compile, the reused generator
batch), one row at a time, each written as soon as measured (bench.json, bench.md), with the fast / reference
ratio; a row that would not fit in what is left of the budget is skipped with a line saying so.
``quality``: the shipped teacher's FID at 35 Heun evaluations, then each of --members (default λ = 1.2 and
λ = ½; eval/bench_members.py names them) distilled for --seconds with in-loop FID every --every-nimg images, then
FID of each final generator over two seed sets; quality.json, quality.md and quality.png (FID against images and
seconds, one line per member, the teacher as a line).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from sid.errors import SidError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The rows of the speed ladder measured on the GPU: each the one before it plus its settings (eval/bench_speed.py;
# bf16 also takes the ladder's no-accumulation and TF32 steps), and "reuse": compile + loss.reuse_generator_batch.
SPEED_MODES = ["reference", "bf16", "fused_adam", "teacher_bf16", "compile", "reuse"]
# Tiny stand-ins for --smoke: a UNet of a few thousand parameters, a handful of images.
SMOKE_UNET = ["teacher.diffusers.unet_config.sample_size=8", "teacher.diffusers.unet_config.layers_per_block=1",
              "teacher.diffusers.unet_config.block_out_channels=[8,8,8]",
              "teacher.diffusers.unet_config.norm_num_groups=4", "optim.batch=8"]


class Budget:
    """The command's wall clock: what is left, and whether a step of ``needs`` seconds still fits."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, needs: float) -> bool:
        return self.left() > needs


def write(out: Path, name: str, result: dict, table: str) -> None:
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(table)


def speed(out: Path, budget: Budget, smoke: bool, iters: int) -> dict:
    """Command A: the GPU tests, then the ladder, a row at a time within the budget."""
    from eval.bench_speed import device_name, markdown, matmul_peak, measure_row, mode_overrides, network_flops, release
    from sid.config import load_config

    tests = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_speed.py", "-k",
                            "gpu", "-rs"], capture_output=True, text=True, timeout=max(budget.left() / 3, 30))
    (out / "gpu_tests.txt").write_text(tests.stdout[-20000:] + tests.stderr[-5000:])
    configs, common = ["speed/cifar_unet"], [f"train.run_dir={out / 'tmp-run'}", "train.progress=false",
                                             "train.tracker=none"]
    overrides = common + (SMOKE_UNET if smoke else [])
    modes = SPEED_MODES
    if smoke:                     # a CPU compile takes minutes (and a compiler): the same rows, eager
        modes, overrides = ["reference", "bf16", "reuse"], overrides + ["perf.compile=false"]
    peak, peak_what = matmul_peak(torch.device(DEVICE), seconds=0.2 if smoke else 2.0)
    flops = network_flops(configs, overrides)
    release()
    result = {"device": device_name(torch.device(DEVICE)), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"),
              "peak_tflop_s": peak / 1e12, "peak_measured_with": peak_what, **flops, "rows": [], "skipped": [],
              "gpu_tests": next((line.strip("= ") for line in reversed(tests.stdout.splitlines())
                                 if any(w in line for w in ("passed", "failed", "skipped", "error"))),
                                f"no result (exit code {tests.returncode})")}
    batch = load_config(configs, overrides).optim.batch
    last = 0.0
    for mode in modes:
        needs = 3 * last if mode != "compile" else 3 * last + 120            # a compile costs minutes on a GPU
        if result["rows"] and not budget.fits(needs):
            result["skipped"].append(f"{mode}: would not fit in the {budget.left():.0f} s left")
            continue
        start = time.monotonic()
        ladder = mode_overrides("compile", batch) + ["loss.reuse_generator_batch=true"] if mode == "reuse" \
            else mode_overrides(mode, batch)
        cfg = load_config(configs, ladder + overrides)
        result["rows"].append(measure_row(mode, cfg, flops, peak, warmup=1 if smoke else 5, iters=iters))
        last = time.monotonic() - start
        rows = result["rows"]
        result["fast_over_reference"] = rows[-1]["img_per_s"] / rows[0]["img_per_s"]
        write(out, "bench", result, markdown(result) + f"\nfast / reference: {result['fast_over_reference']:.2f}×; "
              f"skipped: {'; '.join(result['skipped']) or 'none'}; GPU tests: {result['gpu_tests']}\n")
    return result


def quality(out: Path, budget: Budget, smoke: bool, args) -> dict:
    """Command B: the teacher's FID, each of --members distilled for --seconds, their final FIDs."""
    from eval.bench_fmnist import reference
    from eval.bench_members import MEMBERS
    from eval.bench_speed import device_name
    from sid.config import load_config
    from sid.generator import load_generator
    from sid.metrics import generator_fid, load_reference, make_fid, teacher_fid
    from sid.teachers import build_teacher
    from sid.trainer import train

    ref = out / "ref-test.npz"
    reference(args.ref_source, ref, args.weights)
    metric = make_fid(args.weights).to(DEVICE)
    load_reference(metric, ref)
    teacher_cfg = ["teacher.kind=diffusers", f"teacher.diffusers.path={args.teacher}"]
    teacher = build_teacher(load_config([], teacher_cfg).teacher).to(DEVICE)
    result = {"device": device_name(torch.device(DEVICE)), "date": time.strftime("%Y-%m-%d"), "num": args.num,
              "runs": {}}
    result["teacher_fid"] = teacher_fid(metric, teacher, 18, args.num, device=DEVICE)
    for name in args.members.split(","):
        label, member = MEMBERS[name]
        if not budget.fits(args.seconds + 60):
            result["runs"][name] = {"label": label, "skipped": f"would not fit in the {budget.left():.0f} s left"}
            continue
        run_dir = out / name
        overrides = [*teacher_cfg, *(o.format(real=args.real) for o in member), f"train.max_seconds={args.seconds}",
                     "train.total_nimg=1000000000000",
                     f"eval.every_nimg={args.every_nimg}", f"eval.num={args.num}", f"eval.fid_ref={ref.resolve()}",
                     f"eval.fid_weights={args.weights}", f"train.run_dir={run_dir}", "train.progress=false",
                     "train.tracker=none",
                     *(["optim.batch=8", "train.log_every_nimg=8", "train.num_samples=4"] if smoke else [])]
        run = train(load_config(["fmnist"], overrides))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        generator = load_generator(run_dir / "generator", device=DEVICE)
        finals = [generator_fid(metric, generator, args.num, seed=s) for s in (1, 2)]
        result["runs"][name] = {"label": label, "nimg": run.nimg, "final_fid": finals,
                                "curve": [(r["nimg"], r["seconds"], r["fid"]) for r in records if "fid" in r]}
        write(out, "quality", result, quality_table(result))
    figure(result, out / "quality.png")
    write(out, "quality", result, quality_table(result))
    return result


def quality_table(result: dict) -> str:
    lines = [f"{result['device']}, {result['date']}: FID-{result['num']}; the teacher (Heun, 35 NFE) "
             f"{result['teacher_fid']:.2f}", "", "| member | images | final FID (2 seed sets) | best in-loop FID |",
             "|---|---|---|---|"]
    for run in result["runs"].values():
        if "skipped" in run:
            lines.append(f"| {run['label']} | skipped: {run['skipped']} | | |")
            continue
        best = min((fid for _, _, fid in run["curve"]), default=float("nan"))
        lines.append(f"| {run['label']} | {run['nimg']:,} | {', '.join(f'{v:.2f}' for v in run['final_fid'])} | "
                     f"{best:.2f} |")
    return "\n".join(lines) + "\n"


def figure(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5), dpi=120)
    axes = fig.subplots(1, 2)
    for run in result["runs"].values():
        if run.get("curve"):
            nimg, seconds, fid = zip(*run["curve"])
            axes[0].plot(nimg, fid, marker="o", label=run["label"])
            axes[1].plot(seconds, fid, marker="o", label=run["label"])
    for ax, x in zip(axes, ("generator images", "seconds")):
        ax.axhline(result["teacher_fid"], color="0.3", linestyle=":", label="teacher, Heun 35 NFE")
        ax.set_xlabel(x)
        ax.set_ylabel(f"FID-{result['num']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("speed", "quality"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=480, help="seconds this command may take in all")
    parser.add_argument("--smoke", action="store_true", help="the same code paths on a CPU with tiny sizes")
    parser.add_argument("--iters", type=int, default=20, help="speed: timed iterations per row")
    parser.add_argument("--teacher", default="builtin:fmnist")
    parser.add_argument("--seconds", type=float, default=150, help="quality: training seconds per member")
    parser.add_argument("--members", default="sid,fgm", help="quality: members of eval/bench_members.py's MEMBERS")
    parser.add_argument("--real", default="fashion-mnist:train", help="quality: SiDA's real images (data.source)")
    parser.add_argument("--every-nimg", type=int, default=256_000, help="quality: in-loop FID interval")
    parser.add_argument("--num", type=int, default=10_000, help="quality: samples per FID")
    parser.add_argument("--ref-source", default="fashion-mnist:test")
    parser.add_argument("--weights", default="auto", help="the FID extractor (see `sid fid --help`)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    try:
        if args.command == "speed":
            speed(out, budget, args.smoke, args.iters)
        else:
            quality(out, budget, args.smoke, args)
    except SidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in ("bench.md", "quality.md"):
        if (out / name).is_file():
            print((out / name).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
