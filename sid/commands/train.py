"""Distil a diffusion teacher into a one-step generator.

    sid train --config fmnist                                    # the shipped teacher; presets: configs/
    sid train --config toy_2d loss.lam=fgm train.run_dir=runs/toy
    sid train --config toy_2d --resume                           # the latest state in train.run_dir
    sid train --config my_run.yaml --dry-run                     # print the resolved config and the memory plan
    sid train --config sd3_medium_dit --dry-run --processes 8 --shard --gpu-memory 80     # a node of 8 GPUs
    sid train --config cifar10_edm --trust-code                  # a teacher whose loading runs code (a pickle)
    accelerate launch --multi_gpu --num_processes 4 train.py --config my_run.yaml      # train.py: a clone's
"""

from sid.cli import run
from sid.schema import Config


def trainer():
    from sid.trainer import train

    return train


def main(argv=None, prog=None) -> int:
    return run(__doc__, Config, trainer, argv, prog, trust=True, plan=True)
