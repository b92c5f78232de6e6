"""Two CPU processes (gloo) through `accelerate launch`: the run completes and ranks agree on the weights."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT

pytestmark = pytest.mark.slow                     # end-to-end runs


def test_two_processes_keep_identical_generators(tmp_path):
    """A signal that reaches one rank stops both at the next log interval with a checkpoint; the resumed run
    completes with identical generators on both ranks."""
    overrides = ["teacher.analytic.student_width=32", "teacher.analytic.student_fit_steps=20", "optim.batch=64",
                 "optim.batch_gpu=16", "train.total_nimg=384", "train.log_every_nimg=128", "train.ckpt_every_nimg=384",
                 "train.sample_every_nimg=100000", f"train.run_dir={tmp_path / 'run'}", "train.progress=false",
                 "train.tensorboard=false", "optim.g_lr=1e-3", "optim.fake_lr=1e-3"]
    # CPU processes through torchrun: Accelerate picks gloo when told to use the CPU (its --cpu flag wants mpirun)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}

    def launch(**extra_env):
        return subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             str(ROOT / "tests/dist_worker.py"), str(tmp_path), *overrides],
            capture_output=True, text=True, cwd=ROOT, env={**env, **extra_env}, timeout=600)

    out = launch(SIGNAL_RANK1_AT="192")                       # rank 1 only, between the logs at 128 and 256
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        assert "interrupted at 256 images" in (tmp_path / f"rank{rank}.interrupted").read_text()
    assert [p.name for p in (tmp_path / "run").glob("training-state-*")] == ["training-state-000000000256"]
    out = launch(RESUME="1")
    assert out.returncode == 0, out.stderr[-3000:]
    with safe_open(str(tmp_path / "rank0.safetensors"), "pt") as f:
        assert f.metadata()["world"] == "2"
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)         # ranks draw different noise: equal only if synced
    assert (tmp_path / "run" / "generator" / "generator.safetensors").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3                                   # one writer: the main process
