"""The command line shared by ``train.py`` and ``train_teacher.py``: presets, dotted overrides, --dry-run,
--resume, bad input as one ``error:`` line (exit code 2), and an interruption as one line (exit code 130)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from sid.config import load_config, to_yaml
from sid.errors import SidError


def run(doc: str, schema_class, entry: Callable[[], Callable], argv=None) -> int:
    """Parse ``argv``, load the config of ``schema_class``, then call ``entry()(cfg, resume=...)``.

    ``entry`` returns the training function lazily, so --dry-run and config errors need no heavy imports.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML preset(s), applied in order")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="a checkpoint folder, a run folder, or (no value) the latest in the run folder")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.lam=1.0 optim.batch=128")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, schema_class=schema_class)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        entry()(cfg, resume=args.resume)
    except SidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:       # a signal: after a checkpoint of the last step, or at once (a second one)
        print(f"{e or 'interrupted; the checkpoints already written are kept'}: --resume continues the run",
              file=sys.stderr)
        return 130
    return 0
