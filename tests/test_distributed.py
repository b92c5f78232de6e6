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
                 "train.tracker=none", "optim.g_lr=1e-3", "optim.fake_lr=1e-3"]
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


def test_accelerate_launch_settings_are_honoured_or_refused(tmp_path):
    """``--mixed_precision bf16`` is sid's bf16 mode (the start line says where it came from), a contradicting
    config is one line, and a MULTI_CPU config file that starts one process says so."""
    tiny = ["--config", "toy_2d", "teacher.analytic.student_width=16", "teacher.analytic.student_fit_steps=5",
            "optim.batch=32", "train.total_nimg=32", "train.progress=false", "train.tracker=none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(*flags, run="run", extra=()):
        return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *flags, "train.py", *tiny,
                               f"train.run_dir={tmp_path / run}", *extra],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)

    out = launch("--num_processes", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bf16 autocast (accelerate's mixed_precision=bf16)" in out.stdout
    out = launch("--num_processes", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", run="fp32",
                 extra=["train.precision=fp32"])
    # the launcher adds its own traceback (CalledProcessError) after sid's one line, which names no file of sid's
    before, _, launcher = out.stderr.partition("Traceback")
    assert out.returncode != 0 and "\nerror: accelerate's mixed_precision=bf16 contradicts train.precision=fp32" \
        in before, out.stderr[-2000:]
    assert "sid/" not in launcher and "CalledProcessError" in launcher
    config = tmp_path / "multi_cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
                      "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n")
    out = launch("--config_file", str(config), run="multi_cpu")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warning: accelerate launch was asked for several processes, but one runs" in out.stderr
    assert "fp32 (train.precision=auto)" in out.stdout
