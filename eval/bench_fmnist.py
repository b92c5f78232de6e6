"""The end-to-end result: distil a Fashion-MNIST teacher with each λ preset for a fixed wall-clock budget,
with proxy FID-10k against the test set as training goes, next to the teacher's own FID (Heun, 35 and 79
network evaluations).

    python -m eval.bench_fmnist --out runs/bench_fmnist --seconds 300        # the shipped teacher (builtin:fmnist)

Writes, in --out: ``ref-test.npz`` (reference statistics, computed once), ``teacher_fid.jsonl``, one run
folder per preset (a sweep folder: re-running resumes it), ``report.md`` with figures (FID vs images, teacher
as horizontal lines) and ``bench.md``: the table of images seen, seconds and FID per preset. Extra dotted
overrides apply to every run (e.g. ``optim.batch=512``).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from sid.errors import SidError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def int_list(text: str) -> list[int]:
    """'18,40' -> [18, 40], for argparse (a bad value is its one-line usage error)."""
    try:
        return [int(s) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def reference(source: str, out: Path, weights: str) -> None:
    """Reference statistics of an image source (``sid fid ref``), computed once."""
    from sid.data import load_images
    from sid.metrics import add_images, make_fid, save_reference

    if not out.is_file():
        metric = make_fid(weights).to(DEVICE)
        add_images(metric, load_images(source), real=True)
        save_reference(metric, out)


def teacher_fids(teacher, name: str, ref: Path, steps: list[int], num: int, weights: str, out: Path) -> dict:
    """FID of the teacher's Heun sampler at each step count (2·steps − 1 evaluations), each value kept in ``out``
    (JSON lines) so that a re-run computes only the missing ones."""
    from sid.metrics import load_reference, make_fid, teacher_fid

    done = {r["what"]: r for r in map(json.loads, out.read_text().splitlines())} if out.is_file() else {}
    metric = make_fid(weights).to(DEVICE)
    load_reference(metric, ref)
    teacher.denoiser.to(DEVICE)
    values = {}
    for n in steps:
        what = f"{name} heun nfe={2 * n - 1}"
        if what not in done:
            done[what] = {"what": what, "num": num, "mean": teacher_fid(metric, teacher, n, num, device=DEVICE)}
            with open(out, "a") as f:
                f.write(json.dumps(done[what]) + "\n")
        values[f"teacher, Heun {2 * n - 1} NFE"] = done[what]["mean"]
    return values


def summary_table(out: Path, baselines: dict[str, float]) -> str:
    """preset | λ | images | seconds | images/s | final and best FID, then the teacher rows."""
    from sid.report import best_point, read_run

    lines = ["| run | λ | images | seconds | images/s | final FID | best FID |", "|---|---|---|---|---|---|---|"]
    for folder in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").is_file()):
        run = read_run(folder)
        fids = [r for r in run["records"] if "fid" in r]
        steps = [r for r in run["records"] if "img_per_s" in r]
        if not fids:
            continue
        rate = sum(r["img_per_s"] for r in steps) / max(len(steps), 1)
        best = best_point(run["quality"])
        lines.append(f"| {run['name']} | {run['config'].loss.lam} | {fids[-1]['nimg']} | {fids[-1]['seconds']:.0f} | "
                     f"{rate:.0f} | {fids[-1]['fid']:.2f} | {best[1] if best else float('nan'):.2f} |")
    lines += [f"| {name} | | | | | {value:.2f} | |" for name, value in baselines.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="builtin:fmnist",
                        help="a diffusers teacher folder (e.g. `sid teacher`'s) or builtin:<name>")
    parser.add_argument("--out", required=True)
    parser.add_argument("--presets", default="sid,lambda1,fgm", help="values of loss.lam, comma-separated")
    parser.add_argument("--seconds", type=float, default=300, help="wall-clock budget per preset, FID included")
    parser.add_argument("--every-nimg", type=int, default=128_000, help="in-loop FID interval in images")
    parser.add_argument("--num", type=int, default=10_000, help="samples per FID (10000: the proxy FID-10k)")
    parser.add_argument("--teacher-steps", default="18,40", type=int_list,
                        help="Heun steps for the teacher's FID (35, 79 NFE)")
    parser.add_argument("--ref-source", default="fashion-mnist:test", help="images for the reference statistics")
    parser.add_argument("--weights", default="auto", help="FID feature extractor (see `sid fid --help`)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        from sid.report import write_report
        from sid.sweep import plan, run_sweep
        from sid.teachers import build_teacher

        # Inputs first (teacher, overrides), then the work: the reference statistics take long on a CPU.
        path = args.teacher if args.teacher.startswith("builtin:") else str(Path(args.teacher).resolve())
        ref = out / "ref-test.npz"
        overrides = ["teacher.kind=diffusers", f"teacher.diffusers.path={path}", f"loss.lam={args.presets}",
                     f"train.max_seconds={args.seconds}", "train.total_nimg=1000000000000",
                     f"eval.every_nimg={args.every_nimg}", f"eval.num={args.num}", f"eval.fid_ref={ref.resolve()}",
                     f"eval.fid_weights={args.weights}", "train.progress=false", *args.overrides]
        runs = plan([], overrides, out)
        teacher = build_teacher(runs[0]["config"].teacher)

        out.mkdir(parents=True, exist_ok=True)
        reference(args.ref_source, ref, args.weights)
        baselines = teacher_fids(teacher, path, ref, args.teacher_steps, args.num, args.weights,
                                 out / "teacher_fid.jsonl")
        run_sweep(runs, [], devices=1)
        write_report(out, baselines=baselines)
        table = summary_table(out, baselines)
    except SidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "bench.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
