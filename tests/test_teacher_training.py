"""Training a small EDM teacher: runs, resumes exactly, and exports a folder the distillation loads."""

import json
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_UNET, sid_process
from sid.config import TeacherTrainingConfig, load_config
from sid.errors import SidError
from sid.teacher_training import train_teacher
from sid.teachers.diffusers.unet import load_denoiser


@pytest.fixture
def dataset(tmp_path):
    g = np.random.default_rng(0)
    images = (g.random((64, 8, 8, 1)) > 0.5).astype(np.uint8) * 255                # NHWC uint8
    np.savez(tmp_path / "data.npz", images=images)
    return tmp_path / "data.npz"


def overrides(dataset, run_dir, total):
    unet = json.dumps(TINY_UNET).replace(" ", "")
    return [f"data.source={dataset}", f"unet={unet}", "optim.batch=16", f"train.total_nimg={total}",
            "train.log_every_nimg=32", "train.sample_every_nimg=100000", "train.ckpt_every_nimg=32",
            f"train.run_dir={run_dir}", "train.progress=false", "train.precision=fp32", "optim.warmup_nimg=32"]


@pytest.mark.slow
def test_teacher_trains_resumes_exactly_and_exports(dataset, tmp_path, monkeypatch):
    """Stopped by SIGTERM after its first step (a checkpoint at 16 images, between the scheduled ones) and
    resumed, the teacher ends bit-identical to an uninterrupted run."""
    import sid.teacher_training
    from sid.runtime import TrainingInterrupted

    cfg = lambda run, total: load_config([], overrides(dataset, tmp_path / run, total),  # noqa: E731
                                         schema_class=TeacherTrainingConfig)
    whole, _ = train_teacher(cfg("whole", 64))
    real_loss = sid.teacher_training.denoising_loss
    monkeypatch.setattr(sid.teacher_training, "denoising_loss",
                        lambda *a, **k: signal.raise_signal(signal.SIGTERM) or real_loss(*a, **k))
    with pytest.raises(TrainingInterrupted, match="interrupted at 16 images"):
        train_teacher(cfg("split", 64))
    monkeypatch.undo()
    assert (tmp_path / "split" / "training-state-000000000016").is_dir()
    resumed, nimg = train_teacher(cfg("split", 64), resume="auto")
    assert nimg == 64
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nimg"] for r in records] == [16, 32, 64]
    assert [r["seconds"] for r in records] == sorted(r["seconds"] for r in records)
    with pytest.raises(SidError, match="already holds a run.*--resume"):                 # never overwritten
        train_teacher(cfg("split", 64))
    wider = json.dumps({**TINY_UNET, "block_out_channels": [16, 16]}).replace(" ", "")
    with pytest.raises(SidError, match="does not fit this config's networks"):
        train_teacher(load_config([], overrides(dataset, tmp_path / "split", 96) + [f"unet={wider}"],
                                  schema_class=TeacherTrainingConfig), resume="auto")
    losses = [float(line.split('"loss": ')[1].split(",")[0])
              for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses))
    # the exported folder loads as an EDM teacher and computes what the EMA network computes
    loaded, spec = load_denoiser(str(tmp_path / "whole" / "teacher"), None, None, 0.5)
    assert spec["prediction_type"] == "edm"
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x, torch.tensor([0.3, 5.0])), whole(x, torch.tensor([0.3, 5.0])),
                               rtol=1e-2, atol=2e-3)                                 # stored in fp16
    stored = load_file(tmp_path / "whole" / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert (tmp_path / "whole" / "samples" / "samples-000000000064.png").is_file()


@pytest.mark.slow
def test_a_flow_matching_teacher_trains_and_exports_as_flow(dataset, tmp_path):
    from sid.precond import FlowRule

    flow = ["loss.objective=flow", "loss.p_mean=0", "loss.p_std=1"]
    cfg = load_config([], overrides(dataset, tmp_path / "flow", 64) + flow, schema_class=TeacherTrainingConfig)
    trained, nimg = train_teacher(cfg)
    assert nimg == 64 and isinstance(trained.rule, FlowRule)
    records = [json.loads(line) for line in (tmp_path / "flow" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records)
    loaded, spec = load_denoiser(str(tmp_path / "flow" / "teacher"), None, None, 0.5)
    assert spec["prediction_type"] == "flow"                                     # from its scheduler config
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x, torch.tensor([0.3, 5.0])), trained(x, torch.tensor([0.3, 5.0])),
                               rtol=1e-2, atol=2e-3)                                 # stored in fp16
    with pytest.raises(SidError, match="loss.objective='ddpm' is invalid"):
        load_config([], ["loss.objective=ddpm"], schema_class=TeacherTrainingConfig)


def test_a_failed_teacher_export_keeps_the_last_one(tmp_path, monkeypatch):
    from diffusers import EDMEulerScheduler

    from sid.teachers.diffusers import denoiser_from_config, save_teacher

    weights = tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"
    first = denoiser_from_config(TINY_UNET, "edm", 0.5)
    save_teacher(first, tmp_path / "teacher")
    saved = weights.read_bytes()
    second = denoiser_from_config({**TINY_UNET, "norm_eps": 1e-3}, "edm", 0.5)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EDMEulerScheduler, "save_pretrained", full_disk)
    with pytest.raises(SidError, match=r"could not export the teacher to .* \(No space left on device\)"):
        save_teacher(second, tmp_path / "teacher")
    assert weights.read_bytes() == saved and [p.name for p in tmp_path.iterdir()] == ["teacher"]
    monkeypatch.undo()
    save_teacher(second, tmp_path / "teacher")                                   # replaced when it works
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"]
    assert json.loads((tmp_path / "teacher" / "unet" / "config.json").read_text())["norm_eps"] == 1e-3


@pytest.mark.slow
def test_teacher_out_of_gpu_memory_is_one_line_and_keeps_the_checkpoints(dataset, tmp_path, monkeypatch):
    import sid.teacher_training

    real, calls = sid.teacher_training.denoising_loss, []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                                                   # after the checkpoint at 32
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB.")
        return real(*args, **kwargs)

    monkeypatch.setattr(sid.teacher_training, "denoising_loss", out_of_memory)
    cfg = load_config([], overrides(dataset, tmp_path / "oom", 64), schema_class=TeacherTrainingConfig)
    with pytest.raises(SidError, match=r"^out of GPU memory \(tried to allocate 512.00 MiB\) at optim.batch=16 \(16 "
                                       r"per process\): set a smaller optim.batch; the checkpoints already in .* "
                                       r"are kept"):
        train_teacher(cfg)
    assert [p.name for p in (tmp_path / "oom").glob("training-state-*")] == ["training-state-000000000032"]


@pytest.mark.slow
def test_teacher_cli_dry_run_and_bad_source(tmp_path):
    run = lambda *a: sid_process("teacher", *a)  # noqa: E731
    out = run("--config", "teacher/fmnist", "--dry-run", "optim.batch=48")
    assert out.returncode == 0 and "batch: 48" in out.stdout
    out = run("--config", "fmnist", "--dry-run")                         # a distillation preset: says so
    assert out.returncode == 2 and out.stderr.strip().endswith("fmnist is a config for `sid train`")
    out = sid_process("train", "--config", "teacher/fmnist", "--dry-run")
    assert out.returncode == 2 and out.stderr.strip().endswith("teacher/fmnist is a config for `sid teacher`")
    for wrong in (["--config", "toy_2d", "lr=1"], ["lr=1"]):                 # no config that fits: no hint
        out = sid_process("train", "--dry-run", *wrong)
        assert out.returncode == 2 and out.stderr.startswith("error: unknown config key 'lr'")
        assert "is a config for" not in out.stderr
    out = run(f"data.source={tmp_path / 'none.npz'}", f"train.run_dir={tmp_path}")
    assert out.returncode == 2 and out.stderr.startswith("error: image source") and out.stderr.count("\n") == 1
    with pytest.raises(SidError, match="unknown config key 'optim.lrr'"):
        load_config([], ["optim.lrr=1"], schema_class=TeacherTrainingConfig)


@pytest.mark.parametrize("old,new", [("batch", "optim.batch"), ("ema_halflife_nimg", "ema.halflife_nimg"),
                                     ("run_dir", "train.run_dir"), ("precision", "train.precision"),
                                     ("source", "data.source"), ("objective", "loss.objective")])
def test_keys_of_the_former_teacher_config_name_their_new_place(old, new, tmp_path):
    """The teacher config shares the distillation config's sections; each key it used to have flat is one line
    naming where it went, from the command line or a file."""
    with pytest.raises(SidError, match=rf"config key '{old}' in the command line is now '{new}': write {new}="):
        load_config([], [f"{old}=1"], schema_class=TeacherTrainingConfig)
    (tmp_path / "old.yaml").write_text(f"{old}: 1\n")
    with pytest.raises(SidError, match=rf"config key '{old}' in .*old.yaml is now '{new}'"):
        load_config([tmp_path / "old.yaml"], schema_class=TeacherTrainingConfig)


@pytest.mark.parametrize("gpu", [False, True])
def test_the_preset_is_cpu_sized_without_a_gpu(gpu, monkeypatch):
    """One preset for both machines, as for distillation: on_cpu is the 3.68M-parameter UNet of the shipped
    teacher's recipe, the GPU run the 4.96M default."""
    monkeypatch.setattr("sid.config.gpu_visible", lambda: gpu)
    cfg = load_config(["teacher/fmnist"], schema_class=TeacherTrainingConfig)
    assert (cfg.optim.batch, list(cfg.unet.block_out_channels)) == ((256, [56, 112, 112]) if gpu else
                                                                    (32, [32, 64, 96, 128]))
    assert cfg.train.run_dir == ("runs/teacher_fmnist" if gpu else "runs/teacher_fmnist_cpu")
