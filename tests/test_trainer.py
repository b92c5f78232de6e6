"""End-to-end runs of the trainer (sid/trainer.py) on CPU: smoke run, exact resume, signals, bad input, non-finite
abort, the sampling command on its exports."""

import json
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, sid_process
from sid.cli import main as sid
from sid.config import load_config
from sid.errors import SidError
from sid.trainer import train

pytestmark = pytest.mark.slow                     # end-to-end runs


def test_smoke_run_on_a_tiny_diffusers_teacher(tiny_unet_overrides, tmp_path, monkeypatch):
    out = sid_process("train", *tiny_unet_overrides)
    assert out.returncode == 0, out.stderr
    assert "distilling the diffusers teacher (0.16M parameters, samples 1×8×8) into a one-step generator: " \
           "λ = 1.2 (sid), weighting sid, batch 8 on 1 cpu process, fp32 (train.precision=auto); to 32 images, in " \
           in out.stdout
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["nimg"] for r in records] == [16, 32]
    assert all(np.isfinite(r["loss_g"]) and np.isfinite(r["loss_fake"]) for r in records)
    assert (run / "training-state-000000000032" / "tensors.safetensors").is_file()
    assert Image.open(run / "samples" / "samples-000000000032.png").size == (16, 16)     # 2×2 grid of 8×8
    assert Image.open(run / "samples" / "teacher.png").size == (16, 16)                 # Heun, same seeds
    assert (run / "samples" / "compare.png").is_file()                                 # the two side by side
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    # the export loads without the training code and samples by seed (`sid sample`)
    assert sid(["sample", str(run / "generator"), "--seeds", "0-5", "--out", str(tmp_path / "s.npz")]) == 0
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    assert sid(["sample", str(run), "--seeds", "0-1", "--out", str(tmp_path / "pngs")]) == 0          # run folder
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 2
    assert sid(["sample", str(run / "generator"), "--out", str(tmp_path / "s.jpg")]) == 2       # not a folder
    assert not (tmp_path / "s.jpg").exists()
    assert sid(["sample", str(run / "generator"), "--seeds", "0-x", "--out", str(tmp_path / "s.png")]) == 2
    monkeypatch.setattr("sid.commands.sample.write", lambda *a: signal.raise_signal(signal.SIGINT))   # Ctrl-C
    assert sid(["sample", str(run), "--out", str(tmp_path / "c.png")]) == 130


def test_readme_main_command_distils_the_shipped_teacher(tmp_path, monkeypatch):
    """The fmnist preset on a CPU: the on_cpu settings (batch 32, a time budget) and the comparison figure."""
    monkeypatch.setattr("sid.config.gpu_visible", lambda: False)
    cfg = load_config(["fmnist"], ["train.total_nimg=64", f"train.run_dir={tmp_path}",
                                                       "train.num_samples=4", "train.progress=false"])
    assert cfg.optim.batch == 32 and cfg.train.max_seconds > 0
    run = train(cfg)
    assert run.nimg == 64 and (tmp_path / "generator" / "generator.safetensors").is_file()
    assert Image.open(tmp_path / "samples" / "teacher.png").size == (64, 64)            # 2×2 grid of 32×32
    assert Image.open(tmp_path / "samples" / "compare.png").size[0] > 2 * 64


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = text.split("runs in the tests, `tests/test_trainer.py`):\n\n```python\n", 1)[1].split("```", 1)[0]
    quick = '"train.progress=false", "teacher.analytic.student_fit_steps=100", "train.run_dir'   # CPU seconds
    monkeypatch.chdir(ROOT)
    exec(block.replace("runs/api", str(tmp_path / "api")).replace('"train.run_dir', quick), {})
    assert (tmp_path / "api" / "generator" / "generator.safetensors").is_file()


def toy_overrides(tmp_path, name, total):
    return ["teacher.analytic.student_width=32", "teacher.analytic.student_fit_steps=20", "optim.batch=64",
            f"train.total_nimg={total}", "train.log_every_nimg=128", "train.sample_every_nimg=100000",
            "train.ckpt_every_nimg=256", f"train.run_dir={tmp_path / name}", "train.progress=false",
            "train.tracker=none", "ema.halflife_nimg=500"]


@pytest.mark.parametrize("reuse", [False, True])
def test_resume_is_exact(tmp_path, reuse):
    """A run stopped at 256 images and resumed to 512 ends bit-identical to an uninterrupted 512-image run."""
    extra = [f"loss.reuse_generator_batch={reuse}"]
    whole = train(load_config([], toy_overrides(tmp_path, "whole", 512) + extra))
    train(load_config([], toy_overrides(tmp_path, "split", 256) + extra))
    resumed = train(load_config([], toy_overrides(tmp_path, "split", 512) + extra), resume="auto")
    assert resumed.nimg == whole.nimg == 512
    for name in ("generator", "fake_score"):
        a, b = getattr(whole, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = whole.ema.model.state_dict(), resumed.ema.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported_a = load_file(tmp_path / "whole" / "generator" / "generator.safetensors")
    exported_b = load_file(tmp_path / "split" / "generator" / "generator.safetensors")
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)


def signal_at(monkeypatch, nimg: int, *signals):
    """Make the trainer's iteration send itself ``signals`` right after it reaches ``nimg`` images."""
    import sid.trainer

    real = sid.trainer.iteration

    def signalled(run):
        out = real(run)
        if run.nimg == nimg:
            for signum in signals:
                signal.raise_signal(signum)
        return out
    monkeypatch.setattr(sid.trainer, "iteration", signalled)


def test_a_signal_checkpoints_the_step_and_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """SIGTERM (a cluster's notice) or Ctrl-C mid-run: the run stops after that step with a checkpoint of it
    (between the scheduled ones at 256 and 512), and resuming ends bit-identical to a run never interrupted.
    The command line says so in one line (exit code 130). A second signal stops at once, keeping the
    checkpoints already written."""
    from sid.trainer import TrainingInterrupted

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    whole = train(load_config([], toy_overrides(tmp_path, "whole", 512)))
    signal_at(monkeypatch, 192, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="interrupted at 192 images"):
        train(load_config([], toy_overrides(tmp_path, "split", 512)))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers      # restored
    run_dir = tmp_path / "split"
    assert (run_dir / "training-state-000000000192").is_dir()
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["nimg"] == 128   # no extra record
    monkeypatch.undo()
    resumed = train(load_config([], toy_overrides(tmp_path, "split", 512)), resume="auto")
    a, b = whole.ema.model.state_dict(), resumed.ema.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the interval the signal cut (128 to 256) is logged as the uninterrupted run logged it
    timeless = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "img_per_s")}  # noqa: E731
                          for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert timeless("split") == timeless("whole") and len(timeless("whole")) == 4

    signal_at(monkeypatch, 64, signal.SIGINT)
    capsys.readouterr()
    code = sid(["train", *toy_overrides(tmp_path, "cli", 512)])
    assert code == 130 and capsys.readouterr().err.strip().endswith("--resume continues the run")
    assert (tmp_path / "cli" / "training-state-000000000064").is_dir()

    monkeypatch.undo()
    signal_at(monkeypatch, 320, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(load_config([], toy_overrides(tmp_path, "twice", 512)))
    assert not isinstance(stopped.value, TrainingInterrupted)
    assert sorted(p.name for p in (tmp_path / "twice").glob("training-state-*")) == ["training-state-000000000256"]


def test_bf16_autocast_run(tmp_path):
    run = train(load_config([], toy_overrides(tmp_path, "bf16", 256) + ["train.precision=bf16"]))
    record = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["loss_g"]) and record["dropped_samples"] == 0
    assert all(p.dtype == torch.float32 for p in run.generator.parameters())          # fp32 master weights


def test_teacher_reference_samples(tmp_path):
    (tmp_path / "t.yaml").write_text("teacher:\n  analytic:\n    modes: 3\n")
    out = sid_process("sample", "--teacher", tmp_path / "t.yaml", "--steps", "12", "--seeds", "0-999",
                      "--out", tmp_path / "t.npz")
    assert out.returncode == 0, out.stderr
    from sid.metrics import mode_weights
    from sid.teachers.analytic import ring_mixture

    weights = mode_weights(ring_mixture(modes=3), torch.from_numpy(np.load(tmp_path / "t.npz")["samples"]))
    assert (weights[:3] - 1 / 3).abs().max() < 0.05 and weights[3] < 0.02          # Heun samples the mixture


def test_a_diffusers_teacher_samples_without_a_config(tmp_path):
    """--teacher takes a diffusers folder or builtin:<name> directly, as the config naming it would."""
    from sid.teachers.diffusers.files import ASSETS

    for teacher in ("builtin:fmnist", ASSETS / "fmnist", "fmnist"):                  # the last: the preset
        assert sid(["sample", "--teacher", str(teacher), "--steps", "2", "--seeds", "0-1",
                    "--out", str(tmp_path / "t.npz")]) == 0
        images = np.load(tmp_path / "t.npz")["images"]
        assert images.shape == (2, 32, 32, 1)
        if teacher == "builtin:fmnist":
            first = images
        assert np.array_equal(images, first)                                         # the same teacher


def test_missing_teacher_path_is_one_clear_line(tmp_path):
    out = sid_process("train", "teacher.kind=diffusers", f"teacher.diffusers.path={tmp_path / 'nope'}",
                      f"train.run_dir={tmp_path}")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: teacher path") and "does not exist" in out.stderr


def test_corrupt_checkpoint_on_resume_is_one_clear_line_and_keeps_files(tmp_path, capsys):
    overrides = toy_overrides(tmp_path, "run", 256)
    train(load_config([], overrides))
    state = tmp_path / "run" / "training-state-000000000256" / "tensors.safetensors"
    state.write_bytes(state.read_bytes()[:100])                                       # truncated
    capsys.readouterr()
    code = sid(["train", *overrides[:-4], "train.total_nimg=512", f"train.run_dir={tmp_path / 'run'}", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is unreadable" in err
    assert state.is_file() and (tmp_path / "run" / "generator" / "generator.safetensors").is_file()


@pytest.mark.parametrize("target", ["sid.checkpoint.save_file", "sid.generator.save_file"])
def test_a_full_disk_is_one_clear_line_and_keeps_the_saved_states(tmp_path, monkeypatch, capsys, target):
    """The second checkpoint (512 images) cannot be written: one error line, the state and export of 256 stay,
    no temporary files are left, and the run resumes from 256 once there is space."""
    import importlib

    module, name = target.rsplit(".", 1)
    real, calls = getattr(importlib.import_module(module), name), []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, full_disk)
    capsys.readouterr()
    assert sid(["train", *toy_overrides(tmp_path, "full", 512)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(No space left on device)" in err and "free space" in err
    run_dir = tmp_path / "full"
    assert (run_dir / "training-state-000000000256" / "tensors.safetensors").is_file()
    assert json.loads((run_dir / "generator" / "generator.json").read_text())["nimg"] == 256
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    monkeypatch.undo()
    assert train(load_config([], toy_overrides(tmp_path, "full", 512)), resume="auto").nimg == 512


OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                 "1.06 GiB is free.\nIf reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF")


def test_out_of_gpu_memory_is_one_line_naming_the_batch_and_keeps_the_checkpoints(tmp_path, monkeypatch, capsys):
    """Out of memory in the fifth iteration (after the checkpoint at 256 images): one error line naming the
    allocation and the per-process batch to lower; the checkpoint stays and the run resumes from it."""
    from sid import losses

    real, calls = losses.generator_loss, []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise torch.cuda.OutOfMemoryError(OUT_OF_MEMORY)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "generator_loss", out_of_memory)
    capsys.readouterr()
    assert sid(["train", *toy_overrides(tmp_path, "oom", 512), "optim.batch_gpu=32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of GPU memory (tried to allocate 2.00 GiB) at "
                                                   "optim.batch_gpu=32 per process: set a smaller optim.batch_gpu")
    assert len(calls) == 10 and [p.name for p in (tmp_path / "oom").glob("training-state-*")] == [
        "training-state-000000000256"]                                   # 2 accumulation rounds per step
    monkeypatch.undo()
    assert train(load_config([], toy_overrides(tmp_path, "oom", 512)), resume="auto").nimg == 512


def poison_one_sample(monkeypatch, loss_name: str) -> None:
    """Make the loss function ``loss_name`` (sid/losses.py) return one NaN sample per batch."""
    import sid.losses

    real = getattr(sid.losses, loss_name)

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        return torch.cat([loss[:1] * float("nan"), loss[1:]])

    monkeypatch.setattr(sid.losses, loss_name, poisoned)


def test_non_finite_steps_are_counted_then_abort(tmp_path, monkeypatch):
    poison_one_sample(monkeypatch, "generator_loss")
    overrides = toy_overrides(tmp_path, "nan", 640) + ["train.max_nonfinite_steps=5"]
    with pytest.raises(SidError, match=r"aborting: 6 consecutive steps had non-finite.*are kept"):
        train(load_config([], overrides))                                            # checked every 2 steps
    record = json.loads((tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["dropped_samples"] == 2 and record["nonfinite_steps"] == 2          # 128 images = 2 steps
    assert [p.name for p in (tmp_path / "nan").glob("training-state-*")] == ["training-state-000000000256"]


def test_reuse_counts_the_extra_first_fake_step_in_the_statistics(tmp_path, monkeypatch):
    """With loss.reuse_generator_batch the first iteration has two fake-score updates; both are counted."""
    poison_one_sample(monkeypatch, "fake_score_loss")
    train(load_config([], toy_overrides(tmp_path, "reuse", 128) + ["loss.reuse_generator_batch=true"]))
    record = json.loads((tmp_path / "reuse" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["dropped_samples"] == 3 and record["nonfinite_steps"] == 2          # 2 + 1 fake updates


def test_the_best_evaluation_exports_its_generator(tmp_path, monkeypatch):
    """generator-best/ holds the EMA generator of the run's lowest in-loop value (NaN never counts); a resumed
    run reads the best so far back from metrics.jsonl."""
    import sid.maintenance
    from sid.checkpoint import load_training_state

    values = iter([0.5, 0.3, float("nan"), 0.4, 0.35, 0.2])                 # at 128, 256, ..., 768 images
    monkeypatch.setattr(sid.maintenance, "sliced_wasserstein", lambda a, b: next(values))
    run_dir = tmp_path / "best"

    def best(total, resume=None):
        evaluation = ["eval.every_nimg=128", "eval.num=64", "train.keep_ckpts=9"]
        train(load_config([], toy_overrides(tmp_path, "best", total) + evaluation), resume=resume)
        record = json.loads((run_dir / "generator-best" / "generator.json").read_text())
        return record["nimg"], record["swd"]

    assert best(512) == (256, 0.3)
    weights = load_file(run_dir / "generator-best" / "generator.safetensors")
    ema = load_training_state(run_dir / "training-state-000000000256")["ema"]
    assert weights and all(torch.equal(w, ema[f"denoiser.{k}"]) for k, w in weights.items())
    assert best(640, resume="auto") == (256, 0.3)                               # 0.35: not better
    assert best(768, resume="auto") == (768, 0.2)


def test_wall_clock_budget_stops_at_a_log_interval_with_a_checkpoint(tmp_path, monkeypatch):
    import sid.trainer

    clock = iter(range(0, 10**6, 10))                       # every call to time.time() advances 10 s
    monkeypatch.setattr(sid.trainer.time, "time", lambda: next(clock))
    run = train(load_config([], toy_overrides(tmp_path, "timed", 6400) + ["train.max_seconds=25"]))
    assert run.nimg < 6400 and run.nimg % 128 == 0                                   # stopped when logging
    assert (tmp_path / "timed" / f"training-state-{run.nimg:012d}").is_dir()
    resumed = train(load_config([], toy_overrides(tmp_path, "timed", run.nimg + 128)), resume="auto")
    assert resumed.nimg == run.nimg + 128


def test_resume_after_a_kill_keeps_one_record_per_image_count_and_the_clock(tmp_path, monkeypatch):
    """A run killed after a checkpoint resumes from it: metrics.jsonl and TensorBoard keep one record per image
    count (the steps past the checkpoint are redone and logged again), a torn line is dropped, and ``seconds``
    counts on from the earlier session (checkpoints at 256 and 512). A fresh start over the folder is refused
    and leaves it as it was."""
    import sid.trainer

    clock = iter(range(0, 10**6, 10))                       # every call to time.time() advances 10 s
    monkeypatch.setattr(sid.trainer.time, "time", lambda: next(clock))
    overrides = toy_overrides(tmp_path, "killed", 512) + ["train.tracker=tensorboard"]  # log every 128 images,
    train(load_config([], overrides))
    run_dir = tmp_path / "killed"
    shutil.rmtree(run_dir / "training-state-000000000512")              # killed after logging 512 images
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"nimg": 64')                                           # ... in the middle of a write
    config = (run_dir / "config.yaml").read_text()
    with pytest.raises(SidError, match="already holds a run.*add --resume"):
        train(load_config([], overrides + ["loss.lam=fgm"]))
    assert (run_dir / "config.yaml").read_text() == config and (run_dir / "training-state-000000000256").is_dir()
    train(load_config([], overrides), resume="auto")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nimg"] for r in records] == [128, 256, 384, 512]
    assert [r["seconds"] for r in records] == sorted(r["seconds"] for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard"))                             # both sessions' files
    board.Reload()
    assert [e.step for e in board.Scalars("loss_g")] == [128, 256, 384, 512]          # TensorBoard agrees
    assert [e.step for e in board.Images("samples")] == [512]                          # the scatter, at the end


def test_resume_with_other_networks_is_one_clear_error(tmp_path):
    train(load_config([], toy_overrides(tmp_path, "run", 256)))
    wider = toy_overrides(tmp_path, "run", 512) + ["teacher.analytic.student_width=48"]
    with pytest.raises(SidError, match="does not fit this config's networks.*config.yaml"):
        train(load_config([], wider), resume="auto")


@pytest.mark.parametrize("reuse", [False, True])
def test_reused_generator_batch_saves_one_generator_forward(tmp_path, monkeypatch, reuse):
    """loss.reuse_generator_batch: after the first iteration the generator runs once per iteration (twice
    without it), and the fake score fits exactly the samples of the generator step before it."""
    from accelerate import Accelerator

    import sid.losses
    from sid.run import build
    from sid.trainer import iteration

    cfg = load_config([], toy_overrides(tmp_path, "r", 1024) + ["optim.batch=32", "optim.batch_gpu=16",
                                                               f"loss.reuse_generator_batch={reuse}"])
    run = build(cfg, Accelerator(cpu=True), resume=None)
    outputs, fitted = [], []
    run.generator.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    real = sid.losses.fake_score_loss
    monkeypatch.setattr(sid.losses, "fake_score_loss",
                        lambda net, x, *a, **k: fitted.append(x) or real(net, x, *a, **k))
    iteration(run)                                          # 2 accumulation rounds per step
    outputs.clear(), fitted.clear()
    iteration(run)
    assert len(outputs) == (2 if reuse else 4) and len(fitted) == 2
    if reuse:
        assert all(torch.equal(x, g) for x, g in zip(fitted, outputs))


def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch):
    import accelerate.tracking

    from sid.maintenance import choose_tracker

    assert choose_tracker("none") == (None, None)
    assert choose_tracker("auto") == ("tensorboard", None)                     # installed with the test extra
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    tracker, note = choose_tracker("auto")
    assert tracker is None and note.startswith("note: TensorBoard is not installed")
    with pytest.raises(SidError, match="train.tracker=comet_ml, but comet_ml is not installed: pip install comet-ml"):
        choose_tracker("comet_ml")


def test_wandb_offline_gets_the_metrics_and_the_sample_grids(tmp_path, monkeypatch):
    """Any of Accelerate's trackers by name; wandb (offline, as it runs without a network) receives the losses and
    the sample pictures, and keeps its files in the run folder."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = toy_overrides(tmp_path, "wandb", 256) + ["train.tracker=wandb", "train.sample_every_nimg=128"]
    train(load_config([], overrides))
    (run,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    pictures = sorted(p.name for p in (run / "files" / "media" / "images").glob("*.png"))
    assert [p.split("_")[1] for p in pictures] == ["128", "256"]                   # samples_<step>_<hash>.png
    assert (run / f"run-{run.name.split('-')[-1]}.wandb").stat().st_size > 0       # the logged history
