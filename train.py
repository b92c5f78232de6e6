"""Distil a diffusion teacher into a one-step generator.

    python train.py --config configs/toy_2d.yaml loss.lam=fgm train.run_dir=runs/toy
    accelerate launch --num_processes 4 train.py --config configs/x.yaml
"""

import argparse
import sys

from sid.config import load_config, to_yaml
from sid.errors import SidError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML preset(s), applied in order")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume from a checkpoint folder, a run folder, or (no value) the latest in train.run_dir")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.lam=1.0 optim.batch=128")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        from sid.trainer import train

        train(cfg, resume=args.resume)
    except SidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
