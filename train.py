"""Distil a diffusion teacher into a one-step generator.

    python train.py --config configs/toy_2d.yaml loss.lam=fgm train.run_dir=runs/toy
    python train.py --config configs/toy_2d.yaml --resume                    # the latest state in train.run_dir
    accelerate launch --multi_gpu --num_processes 4 train.py --config configs/x.yaml
"""

import sys

from sid.cli import run
from sid.config import Config


def trainer():
    from sid.trainer import train

    return train


if __name__ == "__main__":
    sys.exit(run(__doc__, Config, trainer))
