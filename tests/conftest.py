import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from edm_pickles import edm_side  # noqa: E402, F401  (a fixture: EDM's modules while a test writes pickles)


def sid_process(*args, cwd=ROOT, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m sid ARGS`` (the ``sid`` command) in a child process, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "sid", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, **kwargs)

# A diffusers UNet2DModel small enough for CPU tests (built from config: no download).
TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [16, 32], "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """``tiny_pipeline(name)``: the folder of a tiny latent pipeline of that family (``tiny_pipelines.BUILDERS``),
    built from configs once per session and saved as a user's pipeline folder is."""
    from tiny_pipelines import BUILDERS

    made = {}

    def folder(name: str) -> Path:
        if name not in made:
            made[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return made[name]

    return folder


@pytest.fixture
def tiny_unet_overrides(tmp_path):
    """Dotted overrides for a short training run on a random tiny diffusers teacher."""
    import json

    return [
        "teacher.kind=diffusers", f"teacher.diffusers.unet_config={json.dumps(TINY_UNET).replace(' ', '')}",
        "teacher.diffusers.prediction_type=edm", "optim.batch=8", "train.total_nimg=32",
        "train.log_every_nimg=16", "train.sample_every_nimg=32", "train.ckpt_every_nimg=16",
        f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.num_samples=4",
    ]
