"""The sid command (also `python -m sid`): one subcommand per job, each in sid/commands/.

    sid train --config fmnist                         distil a teacher into a one-step generator
    sid teacher --config teacher/fmnist               train an EDM teacher on images
    sid sweep run --config toy_2d --out runs/sweep loss.lam=0.5,1.0,1.2
    sid sweep report runs/sweep                       report.md and figures of a sweep
    sid sample runs/fmnist/generator --out grid.png   sample a one-step generator (or a teacher)
    sid fid ref|gen|teacher|images ...                FID and its reference statistics
    sid export-lora runs/sd                           the generator as a LoRA on its teacher (diffusers)
    sid export-single-file runs/sd                    an SD 1.x / SDXL generator as one checkpoint file
    sid --version

--config takes a YAML file or the name of a preset shipped in configs/. `sid COMMAND --help` says more.
Bad input is one `error:` line (exit code 2); an interruption is one line (exit code 130) after the
checkpoint of the step under way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from sid.errors import SidError

COMMANDS = {name: f"sid.commands.{name.replace('-', '_')}"
            for name in ("train", "teacher", "sweep", "sample", "fid", "export-lora", "export-single-file")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:
        from importlib.metadata import version

        print(f"sid {version('sid-distill')}")        # the distribution's name (the import package is sid)
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        from sid.config import preset_names

        print(f"{__doc__.strip()}\n\nShipped presets: {', '.join(preset_names())}.")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} (sid --help)",
              file=sys.stderr)
        return 2
    command = importlib.import_module(COMMANDS[argv[0]])
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():    # a scheduler's SIGTERM: as Ctrl-C, one line
        signal.signal(signal.SIGTERM, terminated)
    try:
        return command.main(argv[1:], prog=f"sid {argv[0]}")
    except SidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:            # training and sweeps say how to resume; the other commands just stop
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def terminated(signum, frame):
    raise KeyboardInterrupt("terminated")


def output_path(path, flag: str = "--out", folder: bool = False) -> Path:
    """An output path checked before the work starts: its folder created and written to once (a probe), so that
    a long job never ends in a traceback for want of a folder. ``folder``: the path is itself a folder."""
    path = Path(path)
    where = path if folder else path.parent
    probe = where / ".sid-write-probe"
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SidError(f"{flag} {path}: cannot write there ({e.strerror or e}); give a writable path") from None
    return path


@contextlib.contextmanager
def writing(path, flag: str = "--out"):
    """A write of an output file: a failure (a full disk) is one line."""
    try:
        yield
    except OSError as e:
        raise SidError(f"could not write {flag} {path} ({e.strerror or e}); free space and run the command again") \
            from None


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as sid's one ``error:`` line (exit code 2) instead of the usage text."""

    def error(self, message: str):
        raise SidError(f"{self.prog}: {message} (--help lists the options)")


def parser(doc: str, prog: str | None) -> argparse.ArgumentParser:
    """A subcommand's parser: its module docstring as the description, examples kept as written."""
    return Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run(doc: str, schema_class, entry: Callable[[], Callable], argv=None, prog=None, trust: bool = False,
        plan: bool = False) -> int:
    """``sid train`` and ``sid teacher``: parse ``argv``, load the config of ``schema_class``, then call
    ``entry()(cfg, resume=...)`` (and ``trust_code=...`` where ``trust``: the command offers --trust-code).
    ``plan``: --dry-run also prints the memory plan (``sid.memory``).

    ``entry`` returns the training function lazily, so --dry-run and config errors need no heavy imports.
    """
    p = parser(doc, prog)
    p.add_argument("--config", action="append", default=[], help="YAML file or shipped preset name, applied in order")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="a checkpoint folder, a run folder, or (no value) the latest in the run folder")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config" + (" and the memory plan" if plan else "") + ", and exit")
    if plan:
        p.add_argument("--processes", type=int, default=1, metavar="N",
                       help="with --dry-run: plan for N processes (the launch's --num_processes)")
        p.add_argument("--shard", action="store_true",
                       help="with --dry-run: plan for a sharded launch (accelerate launch --use_fsdp)")
        p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                       help="with --dry-run: the GPU's memory in GiB, for advice (default: the visible GPU's)")
    if trust:
        p.add_argument("--trust-code", action="store_true",
                       help="let the teacher run foreign code: unpickle an EDM pickle, import a teacher.python.factory")
        p.add_argument("--push-to-hub", metavar="REPO_ID",
                       help="when the run ends, upload its generator/ (sid's files, the diffusers form, the model "
                            "card) to this Hugging Face Hub model repository (online; `huggingface-cli login`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.lam=1.0 optim.batch=128")
    args = p.parse_intermixed_args(argv)                    # flags between the overrides too
    if getattr(args, "push_to_hub", None):                   # before the run: a typo costs no training
        from sid.generator import check_repo_id

        check_repo_id(args.push_to_hub)
    # `--resume key=value` is an override (and --resume alone): unless that is a path, as a sweep's `lam=0.5/` is
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    from sid.config import to_yaml

    cfg = load_for_command(args.config, args.overrides, schema_class)
    if plan and (args.processes < 1 or (args.shard and args.processes < 2)):
        raise SidError(f"--processes {args.processes}{' --shard' if args.shard else ''}: sharding splits the networks "
                       "over 2 or more processes; give --processes N >= 2, or drop --shard")
    if args.dry_run:
        print(to_yaml(cfg), end="")
        if plan:
            print_plan(cfg, args)
        return 0
    extra = {"trust_code": args.trust_code, "push_to_hub": args.push_to_hub} if trust else {}
    try:
        entry()(cfg, resume=args.resume, **extra)
    except KeyboardInterrupt as e:       # a signal: after a checkpoint of the last step, or at once (a second one)
        print(f"{e or 'interrupted; the checkpoints already written are kept'}: --resume continues the run",
              file=sys.stderr)
        return 130
    return 0


def print_plan(cfg, args) -> None:
    """The memory plan of ``sid train --dry-run`` for the launch ``--processes``/``--shard`` describe, with advice
    when it exceeds ``--gpu-memory`` (or the visible GPU's memory); as YAML comments, so that the whole output still
    reads as the config."""
    import torch

    from sid import memory
    from sid.config import load_config

    trust = getattr(args, "trust_code", False)
    if cfg.teacher.kind in ("edm_pickle", "python") and not trust:
        print(f"# memory plan: add --trust-code to plan a {cfg.teacher.kind} teacher (building it runs its code)")
        return
    on_gpu = bool(args.gpu_memory) or torch.cuda.is_available()     # else the run trains on this machine's CPU
    try:
        result = memory.plan(cfg, args.processes, args.shard, on_gpu=on_gpu, trust_code=trust)
    except SidError as e:                              # the config is printed all the same
        print(f"# memory plan: not made: {e}")
        return
    lines = result.table().splitlines()
    capacity = (args.gpu_memory * 2**30 if args.gpu_memory else
                torch.cuda.get_device_properties(0).total_memory if on_gpu else machine_memory())
    if not on_gpu:
        size = f" and its {capacity / 2**30:.1f} GiB" if capacity else ""
        lines.append(f"  (no GPU visible: planned for this machine's CPU{size}; --gpu-memory GIB plans for a GPU)")

    def replan(extra, processes, sharded):
        return memory.plan(load_config(args.config, [*args.overrides, *extra]), processes, sharded, on_gpu=on_gpu,
                           trust_code=trust)

    if capacity:
        lines += memory.advice(cfg, result, capacity, args.processes, replan)
    print("\n".join(f"# {line}" for line in lines))


def machine_memory() -> int | None:
    """This machine's memory in bytes, where the system says (POSIX), else None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def load_for_command(files, overrides, schema_class):
    """``load_config``; when it fails on files written for the other trainer (distillation or teacher), the
    error says which command they are for."""
    from sid.config import load_config
    from sid.schema import Config, TeacherTrainingConfig

    try:
        return load_config(files, overrides, schema_class=schema_class)
    except SidError as e:
        other, command = (TeacherTrainingConfig, "teacher") if schema_class is Config else (Config, "train")
        if files and loads(files, other):
            raise SidError(f"{e}; {' '.join(map(str, files))} is a config for `sid {command}`") from None
        raise


def loads(files, schema_class) -> bool:
    from sid.config import load_config

    try:
        load_config(files, schema_class=schema_class)
        return True
    except SidError:
        return False
