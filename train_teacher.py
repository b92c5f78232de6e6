"""Train an EDM teacher (diffusers UNet2DModel) on images, e.g. Fashion-MNIST from Debian's package.

    python train_teacher.py --config configs/teacher/fmnist.yaml total_nimg=20000000 run_dir=runs/teacher
    python train_teacher.py --config configs/teacher/fmnist.yaml --resume        # the latest state in run_dir
    python train.py teacher.kind=diffusers teacher.diffusers.path=runs/teacher/teacher   # then distil it
"""

import sys

from sid.cli import run
from sid.config import TeacherTrainingConfig


def teacher_trainer():
    from sid.teacher_training import train_teacher

    return train_teacher


if __name__ == "__main__":
    sys.exit(run(__doc__, TeacherTrainingConfig, teacher_trainer))
