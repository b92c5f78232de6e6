"""Training state on disk without pickles: every tensor in one safetensors file, everything else in JSON.

A state is any nesting of dicts, lists, numbers, strings and tensors (module and optimizer state dicts
included). Saves are atomic (written to a temporary folder, then renamed), so an interrupted save never
replaces the last good state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sid.errors import SidError

PREFIX = "training-state-"


def _split(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """Replace each tensor by a reference into ``tensors``; tag tuples and dicts whose keys are not all strings."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _split(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _join(v, tensors) for k, v in obj["__items__"]}
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_training_state(run_dir: str | Path, nimg: int, state: dict, keep: int = 2) -> Path:
    """Write ``run_dir/training-state-<nimg>/`` atomically; keep only the newest ``keep`` states."""
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{nimg:012d}"
    tmp = run_dir / f".tmp-{PREFIX}{nimg:012d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors, "state")
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "tensors.safetensors")
        (tmp / "state.json").write_text(json.dumps(skeleton))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:                    # a full disk, a lost mount: the states already saved stay as they are
        shutil.rmtree(tmp, ignore_errors=True)
        raise SidError(f"could not write {final} ({e.strerror or e}); the training states already in {run_dir} "
                       "are kept: free space (or fix the folder) and resume") from None
    for old in list_training_states(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_training_states(run_dir: str | Path) -> list[Path]:
    """Complete training states in a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    states = [p for p in run_dir.iterdir() if p.is_dir() and re.fullmatch(PREFIX + r"\d{12}", p.name)]
    return sorted(states)


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``auto``: the newest state in run_dir (None when there is none); otherwise a state folder or a run folder."""
    path = Path(run_dir) if resume == "auto" else Path(resume)
    if resume != "auto" and not path.exists():
        raise SidError(f"--resume {resume}: no such checkpoint or run folder")
    if re.fullmatch(PREFIX + r"\d{12}", path.name):
        return path
    states = list_training_states(path)
    if not states and resume != "auto":
        raise SidError(f"--resume {resume}: the folder holds no {PREFIX}* checkpoint")
    return states[-1] if states else None


def restore(path: str | Path, state: dict, **targets) -> None:
    """``target.load_state_dict(state[name])`` for each named target; a state that does not fit is one error."""
    try:
        for name, target in targets.items():
            target.load_state_dict(state[name])
    except (KeyError, RuntimeError, ValueError) as e:
        raise SidError(f"checkpoint {path} does not fit this config's networks ({str(e).splitlines()[0][:160]}); "
                       "resume with the settings it was saved with (the run folder's config.yaml)") from None


def check_fresh_start(run_dir: str | Path, resume: str | None, key: str = "train.run_dir") -> None:
    """A run started without ``--resume`` must not write over the training states of an earlier run."""
    states = list_training_states(run_dir)
    if resume is None and states:
        raise SidError(f"{run_dir} already holds a run (up to {states[-1].name}): add --resume to continue it, "
                       f"or set {key} to a new folder (or delete this one) to start over")


def load_training_state(path: str | Path) -> dict:
    path = Path(path)
    try:
        tensors = load_file(path / "tensors.safetensors")
        return _join(json.loads((path / "state.json").read_text()), tensors)
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, ValueError) as e:
        raise SidError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"delete it to resume from the previous one, or pass --resume with another checkpoint"
        ) from None
