"""The identity family ranked on one teacher: SiD (λ = 1.2, 1, ½), DMD, SIM and SiDA, each distilled from the same
teacher with the same settings otherwise, for the same images (the preset's ``train.total_nimg``) or the same
wall-clock seconds (``--seconds``), and measured the same way.

    python -m eval.bench_members --config toy_2d --out runs/bench/members_toy --seeds 0,1 \\
        eval.every_nimg=64000 eval.num=4000
    python -m eval.bench_members --config fmnist --out runs/bench/members_fmnist --seconds 600 \\
        --members sid,fgm,dmd,sim,sida --real fashion-mnist:train --fid-ref runs/refs/fmnist-test-2k.npz \\
        --num 2000 loss.g_start_nimg=640 loss.gan_start_nimg=1280

Quality is the run's in-loop metric (sliced Wasserstein for analytic teachers, ``eval.every_nimg``) and, with
``--fid-ref``, the FID of each final EMA generator over ``--num`` samples (seeds 0 to num − 1). SiDA reads
``--real`` (its ``data.source``; an analytic teacher's exact samples by default). Writes one run folder per
member and seed (re-running resumes or skips them), ``members.json``, ``members.md`` (the table) and
``members.png`` (quality against images and against seconds, the mean over seeds). Extra dotted overrides apply
to every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from sid.errors import SidError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MEMBERS = {                            # name: (label, overrides); {real} is --real
    "sid": ("SiD λ = 1.2", ["loss.kind=sid", "loss.lam=1.2"]),
    "lambda1": ("SiD λ = 1", ["loss.kind=sid", "loss.lam=1.0"]),
    "fgm": ("SiD λ = ½ (FGM)", ["loss.kind=sid", "loss.lam=0.5"]),
    "dmd": ("DMD", ["loss.kind=dmd"]),
    "sim": ("SIM (c = 1)", ["loss.kind=sim"]),
    "sida": ("SiDA λ = 1.2", ["loss.kind=sida", "loss.lam=1.2", "data.source={real}"]),
    "sida_lambda1": ("SiDA λ = 1", ["loss.kind=sida", "loss.lam=1.0", "data.source={real}"]),
    "sida_fgm": ("SiDA λ = ½", ["loss.kind=sida", "loss.lam=0.5", "data.source={real}"]),
}


def names(text: str) -> list[str]:
    chosen = [s for s in text.split(",") if s]
    unknown = [s for s in chosen if s not in MEMBERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown members {unknown}; choose from {', '.join(MEMBERS)}")
    return chosen


def run_member(config: str, name: str, seed: int, out: Path, args) -> dict:
    """Train one member (resumed where a run folder exists) and read what it measured."""
    from sid.config import load_config
    from sid.trainer import train

    run_dir = out / f"{name}_seed={seed}"
    overrides = [o.format(real=args.real) for o in MEMBERS[name][1]] + [
        f"train.seed={seed}", f"train.run_dir={run_dir}", "train.progress=false", "train.tracker=none",
        *([f"train.max_seconds={args.seconds}", "train.total_nimg=1000000000000"] if args.seconds else []),
        *args.overrides]
    run = train(load_config([config], overrides), resume="auto")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["nimg"], r["seconds"], r[k]) for r in records for k in ("swd", "fid") if k in r]
    rates = [r["img_per_s"] for r in records if "img_per_s" in r]
    seconds = next((r["seconds"] for r in reversed(records) if "seconds" in r), None)
    return {"member": name, "seed": seed, "nimg": run.nimg, "seconds": seconds,
            "img_per_s": statistics.mean(rates) if rates else None, "curve": curve,
            "metric": next((k for r in records for k in ("swd", "fid") if k in r), None)}


def final_fid(result: dict, out: Path, args) -> float:
    """FID of the run's exported EMA generator over --num samples against --fid-ref."""
    from sid.generator import load_generator
    from sid.metrics import generator_fid, load_reference, make_fid

    metric = make_fid(args.weights).to(DEVICE)
    load_reference(metric, Path(args.fid_ref))
    generator = load_generator(out / f"{result['member']}_seed={result['seed']}", device=DEVICE)
    return generator_fid(metric, generator, args.num, seed=0)


def table(results: list[dict], machine: str) -> str:
    """member | images | seconds | images/s | final in-loop value | final FID, the mean (± spread) over seeds."""
    def spread(values, digits=3):
        values = [v for v in values if v is not None]
        if not values:
            return ""
        mean = statistics.mean(values)
        return f"{mean:,.{digits}f}" + (f" ± {statistics.stdev(values):,.{digits}f}" if len(values) > 1 else "")

    metric = next((r["metric"] for r in results if r["metric"]), "in-loop")
    lines = [f"{machine}: one row per member, the mean (± std) over {len({r['seed'] for r in results})} seed(s)", "",
             f"| member | images | seconds | images/s | final {metric} | final FID |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["member"] for r in results):
        rows = [r for r in results if r["member"] == name]
        lines.append(f"| {MEMBERS[name][0]} | {spread([r['nimg'] for r in rows], 0)} | "
                     f"{spread([r['seconds'] for r in rows], 0)} | {spread([r['img_per_s'] for r in rows], 0)} | "
                     f"{spread([r['curve'][-1][2] if r['curve'] else None for r in rows])} | "
                     f"{spread([r.get('fid') for r in rows], 2)} |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict], path: Path) -> None:
    """Quality against images and against seconds, one line per member (the mean over its seeds at each point;
    a final FID is one more marker)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=120)
    axes = fig.subplots(1, 2)
    for name in dict.fromkeys(r["member"] for r in results):
        rows = [r for r in results if r["member"] == name]
        points = min(len(r["curve"]) for r in rows)
        for ax, column in zip(axes, (0, 1)):
            if points:
                x = [statistics.mean(r["curve"][i][column] for r in rows) for i in range(points)]
                y = [statistics.mean(r["curve"][i][2] for r in rows) for i in range(points)]
                line = ax.plot(x, y, marker="o", markersize=3, label=MEMBERS[name][0])[0]
            fids = [r for r in rows if "fid" in r]
            if fids:
                x = statistics.mean(r["nimg" if column == 0 else "seconds"] for r in fids)
                ax.plot([x], [statistics.mean(r["fid"] for r in fids)], marker="*", markersize=10, linestyle="",
                        color=line.get_color() if points else None, label=None if points else MEMBERS[name][0])
    metric = next((r["metric"] for r in results if r["metric"]), None) or "FID"
    for ax, x in zip(axes, ("generator images", "seconds")):
        ax.set_xlabel(x)
        ax.set_ylabel(metric if metric != "fid" else f"FID-{results[0].get('num', '')}")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy_2d", help="the preset every member starts from")
    parser.add_argument("--out", required=True)
    parser.add_argument("--members", type=names, default=list(MEMBERS), help=f"from {', '.join(MEMBERS)}")
    parser.add_argument("--seeds", default="0", help="train.seed values, comma-separated")
    parser.add_argument("--seconds", type=float, default=0, help="wall-clock training seconds per run (0: images)")
    parser.add_argument("--real", default="teacher", help="SiDA's data.source")
    parser.add_argument("--fid-ref", default=None, help="reference statistics for a final FID (`sid fid ref`)")
    parser.add_argument("--num", type=int, default=2000, help="samples of the final FID")
    parser.add_argument("--weights", default="auto", help="the FID extractor (see `sid fid --help`)")
    parser.add_argument("--machine", default="this machine", help="what the table says it ran on")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "members.json"
    done = {(r["member"], r["seed"]): r for r in json.loads(done_file.read_text())} if done_file.is_file() else {}

    runs = [(name, int(seed)) for name in args.members for seed in args.seeds.split(",") if seed]
    try:
        for key in runs:                # every run first, then the FIDs: the timed part runs alone on the machine
            done[key] = done.get(key) or run_member(args.config, *key, out, args)
            done_file.write_text(json.dumps(list(done.values()), indent=1))
        for key in runs if args.fid_ref else ():
            if "fid" not in done[key]:
                done[key].update(fid=final_fid(done[key], out, args), num=args.num)
                done_file.write_text(json.dumps(list(done.values()), indent=1))
    except SidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = [r for r in done.values() if r["member"] in args.members]
    (out / "members.md").write_text(table(results, args.machine))
    figure(results, out / "members.png")
    print((out / "members.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
