"""Train an EDM teacher (diffusers UNet2DModel) on images, e.g. Fashion-MNIST from Debian's package.

    python train_teacher.py --config configs/teacher/fmnist.yaml total_nimg=20000000 run_dir=runs/teacher
    python train_teacher.py --config configs/teacher/fmnist.yaml --resume        # the latest state in run_dir
    python train.py teacher.kind=diffusers teacher.diffusers.path=runs/teacher/teacher   # then distil it
"""

import argparse
import sys

from sid.config import TeacherTrainingConfig, load_config, to_yaml
from sid.errors import SidError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML preset(s), applied in order")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, help="checkpoint, run folder, or latest")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch=128 lr=2e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, schema_class=TeacherTrainingConfig)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        from sid.teacher_training import train_teacher

        train_teacher(cfg, resume=args.resume)
    except SidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
