"""Train an EDM teacher (diffusers UNet2DModel) on images, e.g. Fashion-MNIST from Debian's package.

    sid teacher --config teacher/fmnist train.total_nimg=20000000 train.run_dir=runs/teacher
    sid teacher --config teacher/fmnist --resume                 # the latest state in train.run_dir
    sid train teacher.kind=diffusers teacher.diffusers.path=runs/teacher/teacher     # then distil it
"""

from sid.cli import run
from sid.schema import TeacherTrainingConfig


def teacher_trainer():
    from sid.teacher_training import train_teacher

    return train_teacher


def main(argv=None, prog=None) -> int:
    return run(__doc__, TeacherTrainingConfig, teacher_trainer, argv, prog)
