"""A sweep folder -> report.md with a table (final and best quality per grid point, mean ± std over seeds)
and figures: quality vs images (log scale), losses vs images, and samples of every grid point at the same seeds.
Runs that diverged (failed, non-finite losses, or quality rising past ``rise`` × their best) are marked."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend, nothing to close
from omegaconf import OmegaConf

from sid.config import read_yaml
from sid.errors import SidError, described
from sid.generator import load_generator
from sid.images import image_grid


def read_run(run_dir: Path) -> dict:
    """A run folder's records, status and config; a file that is not what sid writes raises (the caller skips
    the run)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    records = [r for r in map(json.loads, lines) if isinstance(r, dict) and _number(r.get("nimg"))]
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
    if not isinstance(status, dict):
        raise ValueError("status.json is not a mapping")
    config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if config is not None and not isinstance(OmegaConf.select(config, "loss.lam"), (str, int, float)):
        raise ValueError("its config.yaml names no loss.lam")
    quality = [(r["nimg"], r[k]) for r in records for k in ("fid", "swd") if _number(r.get(k))]
    metric = next((k for r in records for k in ("fid", "swd") if k in r), None)
    losses = [(r["nimg"], r["loss_g"], r["loss_fake"]) for r in records
              if _number(r.get("loss_g")) and _number(r.get("loss_fake"))]
    return {"name": run_dir.name, "dir": run_dir, "status": status, "config": config, "metric": metric,
            "quality": quality, "losses": losses, "records": records}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def best_point(quality: list[tuple[int, float]]) -> tuple[int, float] | None:
    """(images, value) of the lowest finite quality value, None when there is none."""
    return min(((n, v) for n, v in quality if math.isfinite(v)), key=lambda p: p[1], default=None)


def diverged(run: dict, rise: float) -> str:
    """Why a run counts as diverged ('' when it did not)."""
    if run["status"].get("state") == "failed":
        return "failed: " + run["status"].get("error", "")[:80]
    if any(not (math.isfinite(g) and math.isfinite(f)) for _, g, f in run["losses"]):
        return "non-finite losses"
    values, best = [v for _, v in run["quality"]], best_point(run["quality"])
    if values and not all(math.isfinite(v) for v in values):
        return "non-finite quality at " + ", ".join(str(n) for n, v in run["quality"] if not math.isfinite(v))
    if values and values[-1] > rise * best[1]:
        return f"quality rose to {values[-1]:.3g} from a best of {best[1]:.3g}"
    return ""


def group_key(run: dict) -> str:
    """The grid point without its seed: runs differing only in train.seed form one row."""
    return "_".join(p for p in run["name"].split("_") if not p.startswith("seed=")) or run["name"]


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def write_report(sweep_dir: str | Path, rise: float = 2.0, num_samples: int = 64,
                 baselines: dict[str, float] | None = None, trust_code: bool = False) -> Path:
    """``baselines``: named quality values drawn as horizontal lines and listed (e.g. the teacher's FID);
    ``trust_code``: as in ``load_generator``, for the sample panels of ``teacher.kind=python`` runs."""
    sweep_dir = Path(sweep_dir)
    baselines = baselines or {}
    if not sweep_dir.is_dir():
        raise SidError(f"no sweep folder at {sweep_dir}: give the --out folder of `sid sweep run`")
    runs = []
    for folder in sorted(sweep_dir.iterdir()):
        if folder.is_dir() and (folder / "config.yaml").is_file():
            try:
                runs.append(read_run(folder))
            except Exception as e:                               # a damaged or foreign file: that run only
                print(f"skipping {folder}: {described(e)}",
                      file=sys.stderr)
    for run in runs:
        run["diverged"] = diverged(run, rise)                    # why, or '' when it did not
    if not runs:
        raise SidError(f"{sweep_dir} holds no runs (folders with config.yaml)")
    metric = next((r["metric"] for r in runs if r["metric"]), None)
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)

    lines = [f"# Sweep report: {sweep_dir.name}", ""]
    if metric:
        lines += quality_table(groups, metric, rise, baselines)
    else:                                                        # nothing measured: say so, and show the losses
        print(f"{sweep_dir}: no run measured its quality (in-loop evaluation off: eval.every_nimg=0); the report "
              "gives the final losses instead", file=sys.stderr)
        lines += loss_table(groups)

    try:                                                         # a full disk, a folder in the way: one line
        colors = {key: f"C{i}" for i, key in enumerate(groups)}
        if metric:
            quality_figure(runs, groups, colors, metric, baselines, sweep_dir / "quality.png")
        else:
            (sweep_dir / "quality.png").unlink(missing_ok=True)    # a figure of an earlier report, now without data

        loss_figure(runs, colors, sweep_dir / "losses.png")
        save_sample_panels(groups, sweep_dir / "samples.png", num_samples, trust_code)
        lines += ["", *(["![quality vs images](quality.png)", ""] if metric else []), "![losses](losses.png)", "",
                  f"Samples of each grid point's first run at seeds 0–{num_samples - 1}:", "",
                  "![samples](samples.png)", ""]
        (sweep_dir / "report.md").write_text("\n".join(lines))
    except OSError as e:
        raise SidError(f"could not write the report in {sweep_dir} ({e.strerror or described(e)}: "
                       f"{e.filename or ''}); free space, or move what stands in its way") from None
    return sweep_dir / "report.md"


def loss_figure(runs, colors, path: Path) -> None:
    """losses.png: each run's generator and fake-score losses against images (the latter on a log scale, where
    it has finite positive values)."""
    fig = Figure(figsize=(10, 3.5), dpi=120)
    axes = fig.subplots(1, 2)
    for run in runs:
        finite = [(n, g, f) for n, g, f in run["losses"] if math.isfinite(g) and math.isfinite(f)]
        if finite:
            n, g, f = zip(*finite)
            axes[0].plot(n, g, color=colors[group_key(run)], label=group_key(run))
            axes[1].plot(n, f, color=colors[group_key(run)], label=group_key(run))
    for ax, title in zip(axes, ("generator loss", "fake-score loss")):
        ax.set_xscale("log")
        ax.set_xlabel("generator images")
        ax.set_title(title, fontsize=9)
    if any(f > 0 for run in runs for _, _, f in run["losses"] if math.isfinite(f)):
        axes[1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def quality_table(groups: dict[str, list[dict]], metric: str, rise: float, baselines: dict[str, float]) -> list[str]:
    """The report's lines on quality: final and best per grid point (mean ± std over seeds), and divergence."""
    lines = [f"Quality metric: `{metric}` (lower is better), EMA generator, fixed seeds. A run counts as diverged "
             f"when it failed, had non-finite losses, or its {metric} ended above {rise}× its best.", "",
             f"| run | λ | seeds | images | final {metric} | best {metric} | best at (images) | diverged |",
             "|---|---|---|---|---|---|---|---|"]
    for key, members in groups.items():
        finals = [r["quality"][-1][1] for r in members if r["quality"]]
        bests = [p for r in members if (p := best_point(r["quality"]))]
        nimg = max((r["quality"][-1][0] if r["quality"] else 0) for r in members)
        marks = "; ".join(f"{r['name']}: {why}" for r in members if (why := r["diverged"])) or "no"
        lines.append(f"| {key} | {lam_of(members)} | {len(members)} | {nimg} | {mean_std(finals)} | "
                     f"{mean_std([v for _, v in bests])} | {', '.join(str(n) for n, _ in bests) or '–'} | {marks} |")
    for name, value in baselines.items():
        lines.append(f"| {name} | | | | {value:.4g} | | | |")
    return lines


def loss_table(groups: dict[str, list[dict]]) -> list[str]:
    """The report's lines when no run measured its quality: the final losses per grid point."""
    lines = ["No run measured its quality: in-loop evaluation was off (`eval.every_nimg` = 0), so this table "
             "gives the final losses (the generator's loss is not a quality measure: it can fall while samples get "
             "worse). Set `eval.every_nimg` (and `eval.fid_ref` for image teachers) to compare quality.", "",
             "| run | λ | seeds | images | final loss_g | final loss_fake | diverged |",
             "|---|---|---|---|---|---|---|"]
    for key, members in groups.items():
        last = [r["losses"][-1] for r in members if r["losses"]]
        marks = "; ".join(f"{r['name']}: {why}" for r in members if (why := r["diverged"])) or "no"
        lines.append(f"| {key} | {lam_of(members)} | {len(members)} | {max((n for n, _, _ in last), default=0)} | "
                     f"{mean_std([g for _, g, _ in last])} | {mean_std([f for _, _, f in last])} | {marks} |")
    return lines


def lam_of(members: list[dict]):
    return members[0]["config"].loss.lam if members[0]["config"] is not None else "?"


def quality_figure(runs, groups, colors, metric, baselines, path: Path) -> None:
    """quality.png: each run's metric against images (log-log), diverged runs dashed, baselines as lines."""
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    names = {key: key + (" (diverged)" if any(r["diverged"] for r in members) else "")
             for key, members in groups.items()}
    shown = {run["name"]: [(n, v) for n, v in run["quality"] if math.isfinite(v) and v > 0] for run in runs}
    for run in runs:
        if shown[run["name"]]:                                   # a log scale: finite, positive values only
            x, y = zip(*shown[run["name"]])
            ax.plot(x, y, color=colors[group_key(run)], label=names[group_key(run)], marker="o", markersize=3,
                    linestyle="--" if run["diverged"] else "-")
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, color="0.3", linestyle=(0, (1, 1 + i)), linewidth=1, label=name)
    if any(shown.values()):
        ax.set_xscale("log")
        ax.set_yscale("log")
    kept = [v for run in runs if not run["diverged"] for _, v in shown[run["name"]]]
    if kept and len(kept) < sum(len(run["quality"]) for run in runs):    # diverged runs leave through the top
        ax.set_ylim(top=3 * max([*kept, *baselines.values()]))
    ax.set_xlabel("generator images")
    ax.set_ylabel(metric)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


@torch.no_grad()
def save_sample_panels(groups: dict[str, list[dict]], path: Path, num: int, trust_code: bool = False) -> None:
    """One panel per grid point: an image grid, or a scatter plot for 2-D samples."""
    exported = [(key, members[0]["dir"] / "generator") for key, members in groups.items()
                if (members[0]["dir"] / "generator" / "generator.safetensors").is_file()]
    cols = max(len(exported), 1)
    fig = Figure(figsize=(3 * cols, 3), dpi=120)
    axes = fig.subplots(1, cols, squeeze=False)
    for ax, (key, folder) in zip(axes[0], exported):
        try:
            generator = load_generator(folder, trust_code=trust_code)
        except SidError as e:
            if "trust_code" in str(e):                       # a permission the command line must give: say so
                raise
            print(f"skipping the samples of {folder}: {e}", file=sys.stderr)
            continue
        x = generator.sample_seeds(range(num if generator.shape != (2,) else 2000))
        if x.ndim == 2 and x.shape[1] == 2:
            ax.scatter(*x.T, s=1, alpha=0.5)
            lim = float(x.abs().quantile(0.99)) * 1.1
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
        elif x.ndim == 4:
            ax.imshow(image_grid(x), cmap="gray" if x.shape[1] == 1 else None)
        ax.set_title(key, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
