"""Sweeps: a grid of config overrides (λ first of all), one run folder each, resumable.

``expand_grid(["loss.lam=0.5,1.0", "train.seed=0,1"])`` gives the four override lists; a sweep folder holds
one sub-folder per grid point, named by its values, each a normal run folder (config.yaml, metrics.jsonl,
checkpoints, exported generator) plus ``status.json``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sid.checkpoint import MARKER
from sid.config import load_config
from sid.errors import SidError, first_line

INTERRUPTED = 130                         # exit code of a run stopped by a signal (checkpointed, resumable)


def split_values(text: str) -> list[str]:
    """'0.5,1.0,[0.9,0.99]' -> ['0.5', '1.0', '[0.9,0.99]']: commas inside brackets do not split."""
    values, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return values + [current]


def expand_grid(overrides: list[str]) -> list[dict[str, str]]:
    """Dotted overrides with comma-separated values -> every combination, in order, as {key: value}."""
    axes = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SidError(f"sweep override {item!r} is not key=value[,value...]")
        axes.append([(key, v) for v in split_values(value)])
    return [dict(combo) for combo in itertools.product(*axes)]


def run_name(point: dict[str, str], varying: list[str]) -> str:
    """Folder name from the values that vary across the sweep, e.g. 'lam=0.5_g_lr=1e-5_seed=0'."""
    parts = [f"{key.split('.')[-1]}={point[key]}" for key in varying] or ["run"]
    return "_".join(parts).replace("/", "-").replace(" ", "")


def plan(config_files, overrides, out_dir) -> list[dict]:
    """The runs of a sweep: name, run folder, override list, resolved config, and whether it already finished."""
    grid = expand_grid(overrides)
    varying = [k for k in (grid[0] if grid else {}) if len({p[k] for p in grid}) > 1]
    runs = []
    for point in grid:
        name = run_name(point, varying)
        run_dir = Path(out_dir) / name
        items = [f"{k}={v}" for k, v in point.items()] + [f"train.run_dir={run_dir}"]
        cfg = load_config(config_files, items)
        runs.append({"name": name, "dir": run_dir, "overrides": items, "config": cfg, "point": point,
                     "state": status(run_dir, cfg.train.total_nimg)})
    return runs


def status(run_dir: Path, total_nimg: int) -> str:
    """finished | failed | partial (resumable) | new | broken (its status.json unreadable: skipped)."""
    marker = run_dir / "status.json"
    if marker.is_file():
        try:
            state = json.loads(marker.read_text())
            nimg = state.get("nimg", 0)
        except (OSError, ValueError, AttributeError):
            return "broken"
        if not isinstance(nimg, int) or isinstance(nimg, bool):                   # a file sid did not write
            return "broken"
        if state.get("state") == "finished" and (state.get("nimg", 0) >= total_nimg or state.get("stopped_by")):
            return "finished"
        if state.get("state") == "failed":
            return "failed"
    return "partial" if any(run_dir.glob("training-state-*")) else "new"


def claim(run_dir: Path) -> None:
    """Create a run's folder as sid's own (the trainer writes into folders only that sid made, or that are empty)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).touch()


def write_status(run_dir: Path, **fields) -> None:
    claim(run_dir)
    (run_dir / "status.json").write_text(json.dumps(fields))


def single_run(config_files, overrides) -> dict:
    """One grid point given as its full override list (train.run_dir included), for a per-GPU process."""
    cfg = load_config(config_files, overrides)
    return {"config": cfg, "dir": Path(cfg.train.run_dir)}


def run_one(run: dict, trust_code: bool = False) -> None:
    """Train (or resume) one grid point in this process; a run that aborts is marked failed, not fatal."""
    import torch

    from sid.trainer import train

    try:
        result = train(run["config"], resume="auto", trust_code=trust_code)
        timed_out = result.nimg < run["config"].train.total_nimg                  # stopped by train.max_seconds
        extra = {"stopped_by": "max_seconds"} if timed_out else {}
        write_status(run["dir"], state="finished", nimg=result.nimg, **extra)
    except (SidError, torch.cuda.OutOfMemoryError) as e:
        write_status(run["dir"], state="failed", error=first_line(e, 1000))


def run_sweep(runs: list[dict], config_files, devices: int = 0, trust_code: bool = False) -> None:
    """Unfinished runs, one after another here, or with ``devices`` > 1 one process per GPU at a time
    (``trust_code`` passed on to each as --trust-code)."""
    todo = [r for r in runs if r["state"] in ("new", "partial")]
    for k, run in enumerate(todo, 1):
        run["position"] = f"run {k} of {len(todo)}"
    if devices <= 1:
        for run in todo:
            print(f"{run['position']}: {run['dir']}", flush=True)
            run_one(run, trust_code)
        return
    configs = [a for f in config_files for a in ("--config", str(f))] + (["--trust-code"] if trust_code else [])
    active: dict[int, tuple[subprocess.Popen, dict]] = {}

    def terminate(signum, frame):        # a scheduler's SIGTERM reaches this process alone: pass it on
        for proc, _ in active.values():
            proc.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt("terminated")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        while todo or active:
            poll(active, todo, devices, configs)
            time.sleep(1)
    except KeyboardInterrupt:            # Ctrl-C reaches the runs too: let them checkpoint, then stop
        for proc, _ in active.values():
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def poll(active: dict, todo: list[dict], devices: int, configs: list[str]) -> None:
    """Collect exited child processes (a crash marks its run failed), then start the next runs on free GPUs."""
    for gpu, (proc, run) in list(active.items()):
        if proc.poll() is None:
            continue
        del active[gpu]
        crashed = proc.returncode not in (0, INTERRUPTED)
        print(f"{run['position']} {'failed' if crashed else 'ended'}: {run['dir']}", flush=True)
        if crashed and status(run["dir"], run["config"].train.total_nimg) != "failed":
            write_status(run["dir"], state="failed",
                         error=f"process exited with code {proc.returncode}; see {run['dir'] / 'sweep.log'}")
    for gpu in range(devices):
        if todo and gpu not in active:
            run = todo.pop(0)
            claim(run["dir"])
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            with open(run["dir"] / "sweep.log", "a") as log:
                proc = subprocess.Popen([sys.executable, "-m", "sid", "sweep", "one", *configs, *run["overrides"]],
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
            active[gpu] = (proc, run)
            print(f"{run['position']}: {run['dir']} on GPU {gpu} (its output in {run['dir'] / 'sweep.log'})",
                  flush=True)
