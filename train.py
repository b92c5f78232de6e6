"""Distil a diffusion teacher into a one-step generator: the same as `sid train`, from a clone.

    python train.py --config fmnist loss.lam=0.75
    accelerate launch --multi_gpu --num_processes 4 train.py --config my_run.yaml
    torchrun --nproc_per_node 4 train.py --config my_run.yaml

`python train.py --help` lists the options; `sid --help` the other commands.
"""

import sys

from sid.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
