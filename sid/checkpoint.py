"""Training state on disk without pickles, and the run folder that holds it.

A state is any nesting of dicts, lists, numbers, strings and tensors (module and optimizer state dicts
included): every tensor in one safetensors file, everything else in JSON, with a checksum of the tensors that
loading verifies. Saves are atomic and durable (written to a temporary folder, flushed to disk, then renamed),
so an interrupted save or a power loss never replaces the last good state. A run folder is claimed by one
training process at a time (a lock file) and marked as ``sid``'s, so that a folder of someone else's files is
never written over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sid.errors import SidError, described, first_line

PREFIX = "training-state-"
MARKER, LOCK = ".sid-run", ".sid-lock"          # "sid made this folder"; "a sid process is writing it"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB blocks (pickles, the Inception file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_error(e: Exception) -> str:
    """What a failed write says: the OS's reason (a full disk, a lost mount), from OSError or safetensors'."""
    if isinstance(e, OSError):
        return e.strerror or first_line(e)
    text = str(e)
    return "No space left on device" if "os error 28" in text or "StorageFull" in text else first_line(e)


def fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_cache(path: Path, key: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A cache file's tensors and metadata (``key``: the config key that names it; ``what``: what it caches), or
    one line saying to delete it."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError) as e:
        raise SidError(f"{key}={path} is not a readable {what} ({type(e).__name__}); delete it and it is made "
                       "again") from None


def write_cache(path: Path, tensors: dict[str, torch.Tensor], metadata: dict, key: str, what: str,
                instead: str) -> None:
    """A cache file written beside, flushed and renamed (a reader never sees half of one); a failure is one line
    (``instead``: what setting ``key`` to null does)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        fsync(tmp)
        tmp.replace(path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise SidError(f"could not write the {what} {path} ({write_error(e)}); free space, or set {key}=null "
                       f"{instead}") from None


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


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
    """Write ``run_dir/training-state-<nimg>/`` atomically and durably; keep only the newest ``keep`` states."""
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{nimg:012d}"
    tmp = run_dir / f".tmp-{PREFIX}{nimg:012d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors, "state")
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "tensors.safetensors")
        (tmp / "state.json").write_text(json.dumps({"state": skeleton, "tensors_sha256": tensors_checksum(tensors)}))
        for path in (tmp / "tensors.safetensors", tmp / "state.json", tmp):
            fsync(path)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(run_dir)
    except (OSError, SafetensorError) as e:    # a full disk, a lost mount: the states already saved stay as they are
        shutil.rmtree(tmp, ignore_errors=True)
        raise SidError(f"could not write {final} ({write_error(e)}); the training states already in {run_dir} "
                       "are kept: free space (or fix the folder) and resume") from None
    for old in list_training_states(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_training_states(run_dir: str | Path) -> list[Path]:
    """Complete training states in a run folder, oldest first (links to states elsewhere are not the run's)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    states = [p for p in run_dir.iterdir()
              if re.fullmatch(PREFIX + r"\d{12}", p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(states)


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``auto``: the newest state in run_dir (None when there is none); otherwise a state folder or a run folder."""
    path = Path(run_dir) if resume == "auto" else Path(resume)
    if resume != "auto" and not path.exists():
        raise SidError(f"--resume {resume}: no such checkpoint or run folder")
    links = [p for p in (path.iterdir() if path.is_dir() else []) if p.name.startswith(PREFIX) and p.is_symlink()]
    if links:
        raise SidError(f"{links[0]} is a link to {os.readlink(links[0])}, a state of another run: remove the link "
                       f"(or resume from that run with --resume {os.readlink(links[0])})")
    if re.fullmatch(PREFIX + r"\d{12}", path.name):
        return path
    states = list_training_states(path)
    if not states and resume != "auto":
        raise SidError(f"--resume {resume}: the folder holds no {PREFIX}* checkpoint")
    return states[-1] if states else None


class Owned:
    """A network's own tensors, as training states hold them: all of a full student's; a LoRA student's adapters,
    not the teacher's weights it shares (``shared``: their ids), which the teacher brings and which are never saved
    twice."""

    def __init__(self, module: torch.nn.Module, shared: frozenset[int] = frozenset()):
        self.module = module
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        self.shared_keys = {name for name, t in named if id(t) in shared}

    def state_dict(self) -> dict:
        return {k: v for k, v in self.module.state_dict().items() if k not in self.shared_keys}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state, strict=not self.shared_keys)


def restore(path: str | Path, state: dict, convert=None, **targets) -> None:
    """``target.load_state_dict(state[name])`` for each named target, after checking that every tensor of the
    state has the shape and dtype of the one it replaces; a state that does not fit is one error. ``convert``:
    ``convert(target, part)`` is what each target loads (an optimiser over sharded parameters: its moments split)."""
    try:
        for name, target in targets.items():
            if name not in state:
                raise ValueError(f"the state has no {name!r}")
            if isinstance(target, torch.optim.Optimizer):
                check_optimizer_state(target, state[name], name)
            else:
                check_module_state(target, state[name], name)
        for name, target in targets.items():
            target.load_state_dict(convert(target, state[name]) if convert else state[name])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise SidError(f"checkpoint {path} does not fit this config's networks ({first_line(e, 200)}); "
                       "resume with the settings it was saved with (the run folder's config.yaml)") from None


def check_module_state(module: torch.nn.Module, state, name: str) -> None:
    own = module.state_dict()
    if not isinstance(state, dict) or set(state) != set(own):
        missing = sorted(set(own) - set(state)) if isinstance(state, dict) else ["all"]
        raise ValueError(f"{name}: keys differ (e.g. {(missing or sorted(set(state) - set(own)))[0]})")
    for key, tensor in own.items():
        saved = state[key]
        if not isinstance(saved, torch.Tensor) or saved.shape != tensor.shape or saved.dtype != tensor.dtype:
            got = (tuple(saved.shape), saved.dtype) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"{name}.{key} is {got}, the network's is {(tuple(tensor.shape), tensor.dtype)}")


def check_optimizer_state(optimizer: torch.optim.Optimizer, state, name: str) -> None:
    """Every per-parameter tensor (Adam's moments) has its parameter's shape and a floating dtype; the groups
    hold as many parameters as the optimiser's."""
    groups = [g["params"] for g in optimizer.param_groups]
    saved = [len(g["params"]) for g in state.get("param_groups", [])] if isinstance(state, dict) else None
    if saved != list(map(len, groups)):
        raise ValueError(f"{name}: its parameter groups differ from the optimiser's")
    params = [p for g in groups for p in g]
    for index, entry in (state.get("state") or {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise ValueError(f"{name}: state of parameter {index!r}, of {len(params)}")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and (value.shape != params[index].shape
                                                                   or not value.is_floating_point()):
                raise ValueError(f"{name}: {key} of parameter {index} is {tuple(value.shape)} {value.dtype}, the "
                                 f"parameter {tuple(params[index].shape)}")


def load_training_state(path: str | Path) -> dict:
    """A saved state, its tensors verified against their checksum and its counters against their types."""
    path = Path(path)
    try:
        tensors = load_file(path / "tensors.safetensors")
        saved = json.loads((path / "state.json").read_text())
        if "tensors_sha256" in saved:                            # states from before checksums have none
            if tensors_checksum(tensors) != saved["tensors_sha256"]:
                raise ValueError("its tensors do not match their checksum: the file was changed or damaged")
            saved = saved["state"]
        state = _join(saved, tensors)
        check_counters(state)
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise SidError(
            f"checkpoint {path} is unreadable ({described(e, 120)}); "
            f"delete it to resume from the previous one, or pass --resume with another checkpoint"
        ) from None
    return state


def check_counters(state) -> None:
    if not isinstance(state, dict):
        raise TypeError("the state is not a mapping")
    for key in ("nimg", "step"):
        if not isinstance(state.get(key), int) or isinstance(state[key], bool) or not 0 <= state[key] < 2**63:
            raise ValueError(f"{key}={state.get(key)!r} is not a count")
    seconds = state.get("seconds", 0.0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds={seconds!r} is not a duration")


def all_finite(*states: dict) -> bool:
    """Whether every floating-point tensor of the state dicts is finite."""
    return all(bool(t.isfinite().all()) for state in states for t in state.values() if t.is_floating_point())


# The run folder ---------------------------------------------------------------------------------------------------

def check_fresh_start(run_dir: str | Path, resume: str | None, key: str = "train.run_dir",
                      exports: tuple[str, ...] = ("generator", "generator-best", "teacher")) -> None:
    """A run started without ``--resume`` must not write over the training states or the exports of an earlier
    run (its states deleted to save space, its ``exports`` kept), nor over a folder of files ``sid`` did not write."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SidError(f"{key}={run_dir} is a file; give a folder for the run")
    states = list_training_states(run_dir)
    if resume is None and states:
        raise SidError(f"{run_dir} already holds a run (up to {states[-1].name}): add --resume to continue it, "
                       f"or set {key} to a new folder (or delete this one) to start over")
    finished = [name for name in exports if (run_dir / name).is_dir() and any((run_dir / name).iterdir())]
    if resume is None and finished:
        raise SidError(f"{run_dir} holds the export of an earlier run ({finished[0]}/) and no training state to "
                       f"continue it: set {key} to a new folder, or move {finished[0]}/ away to start over there")
    foreign = [p for p in run_dir.iterdir()] if run_dir.is_dir() and not (run_dir / MARKER).exists() else []
    if foreign and not states:
        raise SidError(f"{run_dir} holds files that sid did not write (e.g. {foreign[0].name}): set {key} to an "
                       "empty or new folder")


@contextlib.contextmanager
def claimed(run_dir: str | Path, main_process: bool = True):
    """The run folder, created and marked as sid's, and locked for this process while the block runs: a second
    training process on it stops with one line; a lock whose process is gone (killed) is taken over."""
    run_dir = Path(run_dir)
    if not main_process:
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / MARKER).touch()
    except OSError as e:
        raise SidError(f"cannot write to the run folder {run_dir} ({write_error(e)}); give a writable folder") \
            from None
    lock = run_dir / LOCK
    owner = read_lock(lock)
    if owner and owner.get("pid") != os.getpid() and alive(owner):
        raise SidError(f"{run_dir} is in use by process {owner.get('pid')} on {owner.get('host')} (since "
                       f"{owner.get('since')}): wait for it, or delete {lock} if no such process runs")
    try:
        lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    except OSError as e:
        lock.unlink(missing_ok=True)
        raise SidError(f"cannot write to the run folder {run_dir} ({write_error(e)}); free space (or fix the "
                       "folder) and start again") from None
    try:
        yield
    finally:
        if (read_lock(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


def read_lock(lock: Path) -> dict | None:
    try:
        owner = json.loads(lock.read_text())
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}                                      # unreadable: nobody we can name; take it over


def alive(owner: dict) -> bool:
    """Whether a lock's process still runs: known only on this host (elsewhere it counts as running)."""
    if owner.get("host") != socket.gethostname():
        return bool(owner.get("host"))
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def write_config(run_dir: str | Path, text: str, nimg: int) -> None:
    """The resolved config of this start of the run: ``config.yaml`` (the latest) and ``config-<nimg>.yaml``
    (one per start, so a resume with other settings keeps the earlier ones)."""
    run_dir = Path(run_dir)
    try:
        (run_dir / f"config-{nimg:012d}.yaml").write_text(text)
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / "config.yaml")
    except OSError as e:
        raise SidError(f"could not write the config into {run_dir} ({write_error(e)}); free space and start again") \
            from None
