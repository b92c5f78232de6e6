"""No saved work lost: a full disk (a real small file system where the test may mount one), states flushed before
they are renamed, damaged or mismatched states refused in one line, non-finite weights never saved, pictures that
fail after the checkpoint, the config's optimiser settings on resume, run folders claimed and locked."""

import json
import os
import shutil
import socket
import subprocess

import pytest
import torch

from sid.checkpoint import LOCK, list_training_states, load_training_state, save_training_state
from sid.cli import main as sid
from sid.config import load_config
from sid.errors import SidError
from sid.trainer import train


def toy(run_dir, total, *extra):
    return ["teacher.analytic.student_width=32", "teacher.analytic.student_fit_steps=20", "optim.batch=64",
            f"train.total_nimg={total}", "train.log_every_nimg=128", "train.sample_every_nimg=100000",
            "train.ckpt_every_nimg=256", f"train.run_dir={run_dir}", "train.progress=false",
            "train.tracker=none", "ema.halflife_nimg=500", *extra]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs where this process may mount one (root), else None."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk, leave: int):
    """Fill ``disk`` until about ``leave`` bytes are free."""
    free = shutil.disk_usage(disk).free - leave
    with open(disk / "filler", "ab") as f:
        f.write(b"\0" * max(free, 0))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_states(small_disk, tmp_path, capsys, monkeypatch):
    """On a real full file system: the state is one error line (not safetensors' traceback), no temporary
    folder stays, the earlier state is kept and the run resumes once there is space. Where no file system can be
    mounted, the write fails as safetensors fails on one."""
    from safetensors import SafetensorError

    if small_disk is None:                                       # simulate what safetensors raises on ENOSPC
        from sid import checkpoint

        real, calls = checkpoint.save_file, []

        def full(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(*args, **kwargs)
        monkeypatch.setattr(checkpoint, "save_file", full)
        disk = tmp_path / "sim"
        disk.mkdir()
    else:
        disk = small_disk
    run_dir = disk / "run"
    assert sid(["train", *toy(run_dir, 256)]) == 0
    if small_disk is not None:
        fill(small_disk, leave=20_000)                           # room for metrics lines, not for a state
    capsys.readouterr()
    assert sid(["train", *toy(run_dir, 512), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "are kept" in err, err
    assert [p.name for p in list_training_states(run_dir)] == ["training-state-000000000256"]
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    if small_disk is not None:
        fill(small_disk, leave=0)                                 # no room even for a metrics line
        capsys.readouterr()
        assert sid(["train", *toy(run_dir, 512), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "No space left on device" in err
        gen = run_dir / "generator"
        assert sid(["sample", str(gen), "--seeds", "0-999", "--out", str(disk / "s.npz")]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        (small_disk / "filler").unlink()
    else:
        monkeypatch.undo()
    assert train(load_config([], toy(run_dir, 512)), resume="auto").nimg == 512


def test_a_state_is_on_disk_before_it_is_renamed(tmp_path, monkeypatch):
    from sid import checkpoint

    events = []
    monkeypatch.setattr(checkpoint, "fsync", lambda path: events.append(("fsync", path.name)))
    real_replace = os.replace
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: events.append(("rename", a.name)) or
                        real_replace(a, b))
    save_training_state(tmp_path, 64, {"nimg": 64, "step": 1, "w": torch.ones(3)})
    tmp = ".tmp-training-state-000000000064"
    assert events[:4] == [("fsync", "tensors.safetensors"), ("fsync", "state.json"), ("fsync", tmp), ("rename", tmp)]
    assert events[4] == ("fsync", tmp_path.name)                                   # the folder's new entry


@pytest.mark.slow
def test_damaged_and_mismatched_states_are_one_line(tmp_path):
    run_dir = tmp_path / "run"
    train(load_config([], toy(run_dir, 256)))
    state = run_dir / "training-state-000000000256"
    weights = state / "tensors.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10                                                               # one flipped bit in a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(SidError, match="do not match their checksum"):
        load_training_state(state)
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    saved = json.loads((state / "state.json").read_text())
    for key, bad in (("nimg", "256"), ("step", -1), ("seconds", float("inf"))):
        broken = {**saved, "state": {**saved["state"], key: bad}}
        (state / "state.json").write_text(json.dumps(broken))
        with pytest.raises(SidError, match=f"unreadable .*{key}="):
            load_training_state(state)
    (state / "state.json").write_text(json.dumps({**saved, "state": [1, 2]}))
    with pytest.raises(SidError, match="unreadable"):
        load_training_state(state)
    (state / "state.json").write_text(json.dumps(saved))
    # Adam moments of another shape than their parameters: refused before anything is loaded
    moments = load_training_state(state)
    moments["opt_g"]["state"][0]["exp_avg"] = torch.zeros(3)
    save_training_state(run_dir, 320, moments, keep=9)
    with pytest.raises(SidError, match=r"does not fit .*exp_avg of parameter 0 is \(3,\)"):
        train(load_config([], toy(run_dir, 512)), resume=str(run_dir / "training-state-000000000320"))
    shutil.rmtree(run_dir / "training-state-000000000320")
    # a state linked in from another run
    other = tmp_path / "other"
    train(load_config([], toy(other, 256)))
    os.symlink(other / "training-state-000000000256", run_dir / "training-state-000000000384")
    with pytest.raises(SidError, match="is a link to .*a state of another run"):
        train(load_config([], toy(run_dir, 512)), resume="auto")


@pytest.mark.slow
def test_a_failing_resume_keeps_the_config_and_each_start_keeps_its_own(tmp_path):
    run_dir = tmp_path / "run"
    train(load_config([], toy(run_dir, 256)))
    first = (run_dir / "config.yaml").read_text()
    with pytest.raises(SidError, match="does not fit"):
        train(load_config([], toy(run_dir, 512, "teacher.analytic.student_width=48")), resume="auto")
    assert (run_dir / "config.yaml").read_text() == first
    run = train(load_config([], toy(run_dir, 512, "optim.g_lr=3e-6")), resume="auto")
    assert sorted(p.name for p in run_dir.glob("config-*.yaml")) == ["config-000000000000.yaml",
                                                                     "config-000000000256.yaml"]
    assert (run_dir / "config-000000000000.yaml").read_text() == first
    assert "g_lr: 3.0e-06" in (run_dir / "config.yaml").read_text()
    assert all(group["lr"] == 3e-6 for group in run.opt_g.param_groups)              # the config's, not the state's


@pytest.mark.slow
def test_resume_says_which_optimiser_settings_the_config_changed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert sid(["train", *toy(run_dir, 256)]) == 0
    capsys.readouterr()
    assert sid(["train", *toy(run_dir, 512, "optim.g_lr=3e-6", "optim.fake_betas=[0.5,0.99]"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "from the config, not the checkpoint: optim.fake_betas (0.0, 0.999) -> (0.5, 0.99), " \
           "optim.g_lr 1e-05 -> 3e-06" in out


@pytest.mark.slow
def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """Weights gone NaN after the state at 256: no state and no export at 512 (one warning), the finite state
    and export stay."""
    import sid.trainer

    real = sid.trainer.iteration

    def poisoned(run):
        out = real(run)
        if run.nimg == 320:
            with torch.no_grad():
                next(run.generator.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(sid.trainer, "iteration", poisoned)
    run_dir = tmp_path / "run"
    train(load_config([], toy(run_dir, 512, "train.keep_ckpts=1")))
    assert "no training state at 512 images: the weights hold NaN" in capsys.readouterr().err
    assert [p.name for p in list_training_states(run_dir)] == ["training-state-000000000256"]
    assert json.loads((run_dir / "generator" / "generator.json").read_text())["nimg"] == 256


@pytest.mark.slow
def test_a_sample_grid_that_fails_is_a_warning_after_the_checkpoint(tmp_path, monkeypatch, capsys):
    import sid.maintenance

    def broken(run):
        raise ValueError("cannot draw this")

    monkeypatch.setattr(sid.maintenance, "save_sample_grid", broken)
    run = train(load_config([], toy(tmp_path / "run", 256, "train.sample_every_nimg=128")))
    assert run.nimg == 256 and (tmp_path / "run" / "training-state-000000000256").is_dir()
    assert "warning: no sample grid at 128 images (ValueError: cannot draw this); training goes on" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_a_two_dimensional_network_teacher_draws_scatter_plots(tmp_path, monkeypatch):
    """A python teacher with 2-D samples (no exact samples): the generator's points over the teacher's Heun
    samples, not a crash in the image grid."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "flat_teacher.py").write_text(
        "from sid.networks import MLP\nfrom sid.precond import EDMRule, Preconditioned\n"
        "def build():\n    return Preconditioned(MLP((2,), 16, 2), EDMRule(0.5))\n")
    overrides = ["teacher.kind=python", "teacher.python.factory=flat_teacher:build", "teacher.python.shape=[2]",
                 "optim.batch=16", "train.total_nimg=32", "train.log_every_nimg=16", "train.sample_every_nimg=32",
                 f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.tracker=none"]
    train(load_config([], overrides), trust_code=True)
    assert (tmp_path / "run" / "samples" / "samples-000000000032.png").is_file()


def test_a_folder_of_someone_elses_files_is_never_written_over(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert sid(["train", *toy(mine, 128)]) == 2
    assert "holds files that sid did not write (e.g. notes.txt)" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    assert sid(["train", *toy(tmp_path / "afile", 128)]) == 2 and "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_one_training_process_per_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    train(load_config([], toy(run_dir, 128)))
    (run_dir / LOCK).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "since": "earlier"}))
    with pytest.raises(SidError, match=r"is in use by process 1 on .*delete .*\.sid-lock"):
        train(load_config([], toy(run_dir, 256)), resume="auto")
    (run_dir / LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))    # gone
    assert train(load_config([], toy(run_dir, 256)), resume="auto").nimg == 256                   # taken over
    assert not (run_dir / LOCK).exists()                                                          # released


@pytest.mark.slow
def test_a_dropped_sample_alone_is_not_a_non_finite_step(tmp_path, monkeypatch):
    """A sample whose loss is infinite while every gradient stays finite is dropped and counted, and the step is
    not counted non-finite (so it cannot abort the run or block a checkpoint)."""
    import sid.losses

    real = sid.losses.generator_loss

    def one_infinite(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss + torch.where(torch.arange(len(loss)) == 0, float("inf"), 0.0).detach()

    monkeypatch.setattr(sid.losses, "generator_loss", one_infinite)
    train(load_config([], toy(tmp_path / "run", 256, "train.max_nonfinite_steps=1")))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped_samples"] for r in records] == [2, 2] and [r["nonfinite_steps"] for r in records] == [0, 0]
    assert list_training_states(tmp_path / "run")


@pytest.mark.slow
def test_a_run_whose_every_sample_is_dropped_stops_in_one_line(tmp_path, monkeypatch):
    """Every generator loss non-finite (a diverged run, e.g. optim.g_lr=1e6): each step drops all its samples and
    trains on nothing, so it counts as a non-finite step; the run stops in one line, its last good state kept."""
    import sid.losses

    run_dir = tmp_path / "run"
    train(load_config([], toy(run_dir, 256)))
    real = sid.losses.generator_loss
    monkeypatch.setattr(sid.losses, "generator_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(SidError, match=r"aborting: \d+ consecutive steps had non-finite losses"):
        train(load_config([], toy(run_dir, 1024, "train.max_nonfinite_steps=2")), resume="auto")
    assert [p.name for p in list_training_states(run_dir)][-1] == "training-state-000000000256"


@pytest.mark.slow
def test_a_finished_run_whose_states_were_deleted_is_not_written_over(tmp_path):
    """Its training states deleted to save space, its export kept: the same command again is one line, and the
    export, metrics and config stay as they were; --resume (nothing to continue: a start over) is the user's say."""
    run_dir = tmp_path / "run"
    train(load_config([], toy(run_dir, 256)))
    for state in list_training_states(run_dir):
        shutil.rmtree(state)
    kept = {p: p.read_bytes() for p in (run_dir / "generator" / "generator.json", run_dir / "metrics.jsonl",
                                        run_dir / "config.yaml")}
    with pytest.raises(SidError, match=r"holds the export of an earlier run \(generator/\) and no training state"):
        train(load_config([], toy(run_dir, 256)))
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert train(load_config([], toy(run_dir, 256)), resume="auto").nimg == 256
