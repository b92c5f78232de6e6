"""λ sweeps on the analytic teacher: grid expansion, a 3-λ sweep with its report, skipping and resuming."""

import json
import os
import signal

import pytest

from conftest import sid_process
from sid.cli import main as sid
from sid.sweep import expand_grid, plan, run_sweep, split_values

SMALL = ["teacher.analytic.modes=3", "teacher.analytic.student_width=32", "teacher.analytic.student_fit_steps=50",
         "optim.batch=128", "train.total_nimg=2560", "train.log_every_nimg=640", "train.sample_every_nimg=100000",
         "train.ckpt_every_nimg=1280", "train.progress=false", "train.tracker=none", "eval.every_nimg=1280",
         "eval.num=500"]
CONFIG = ["toy_2d"]


def signal_in_run(monkeypatch, lam: str, nimg: int) -> None:
    """Send this process SIGINT (Ctrl-C) when the run of ``loss.lam=lam`` reaches ``nimg`` images."""
    import sid.trainer

    real = sid.trainer.iteration

    def signalled(run):
        out = real(run)
        if str(run.cfg.loss.lam) == lam and run.nimg == nimg:
            signal.raise_signal(signal.SIGINT)
        return out
    monkeypatch.setattr(sid.trainer, "iteration", signalled)


def test_grid_expansion():
    assert split_values("0.5,1.0,[0.9,0.99]") == ["0.5", "1.0", "[0.9,0.99]"]
    grid = expand_grid(["loss.lam=0.5,1.0", "optim.g_betas=[0.9,0.99]", "train.seed=0,1"])
    assert len(grid) == 4 and grid[1] == {"loss.lam": "0.5", "optim.g_betas": "[0.9,0.99]", "train.seed": "1"}


@pytest.mark.slow
def test_sweep_runs_reports_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    overrides = ["loss.lam=0.5,1.0,1.2"] + SMALL
    runs = plan(CONFIG, overrides, tmp_path)
    assert [r["name"] for r in runs] == ["lam=0.5", "lam=1.0", "lam=1.2"] and {r["state"] for r in runs} == {"new"}
    # an interrupted sweep: Ctrl-C while λ=1.0 is at 1280 images, after λ=0.5 finished
    signal_in_run(monkeypatch, "1.0", 1280)
    assert sid(["sweep", "run", "--config", CONFIG[0], "--out", str(tmp_path), *overrides]) == 130
    captured = capsys.readouterr()
    assert "the same `sid sweep run` command resumes the sweep" in captured.err
    assert f"run 1 of 3: {tmp_path / 'lam=0.5'}" in captured.out and "run 3 of 3" not in captured.out
    monkeypatch.undo()
    lines_before = (tmp_path / "lam=0.5" / "metrics.jsonl").read_text()
    runs = plan(CONFIG, overrides, tmp_path)
    assert [r["state"] for r in runs] == ["finished", "partial", "new"]
    run_sweep(runs, CONFIG)
    assert (tmp_path / "lam=0.5" / "metrics.jsonl").read_text() == lines_before          # skipped
    resumed = [json.loads(x) for x in (tmp_path / "lam=1.0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nimg"] for r in resumed if "swd" in r] == [1280, 2560]                     # resumed, not restarted
    assert all(r["state"] == "finished" for r in plan(CONFIG, overrides, tmp_path))

    out = sid_process("sweep", "report", tmp_path, "--baseline", "exact samples, 2 sets=0.035")
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "report.md").read_text()
    for name in ("lam=0.5", "lam=1.0", "lam=1.2"):
        assert f"| {name} |" in report
    assert "| exact samples, 2 sets | | | | 0.035 | | | |" in report
    assert "final swd" in report
    for figure in ("quality.png", "losses.png", "samples.png"):
        assert (tmp_path / figure).stat().st_size > 1000 and f"({figure})" in report


@pytest.mark.slow
def test_a_larger_image_budget_continues_the_finished_runs(tmp_path):
    """Re-running a finished sweep with a larger train.total_nimg resumes each run from its last state."""
    short = ["loss.lam=0.5"] + SMALL + ["train.total_nimg=1280"]
    run_sweep(plan(CONFIG, short, tmp_path), CONFIG)
    metrics = tmp_path / "run" / "metrics.jsonl"                                    # one grid point: "run"
    first = metrics.read_text()
    assert [r["state"] for r in plan(CONFIG, short, tmp_path)] == ["finished"]
    longer = plan(CONFIG, ["loss.lam=0.5"] + SMALL, tmp_path)                          # 2560 images
    assert [r["state"] for r in longer] == ["partial"]
    run_sweep(longer, CONFIG)
    text = metrics.read_text()
    assert text.startswith(first)                                                      # continued, not redone
    assert [json.loads(x)["nimg"] for x in text.splitlines() if "swd" in x] == [1280, 2560]
    assert [r["state"] for r in plan(CONFIG, ["loss.lam=0.5"] + SMALL, tmp_path)] == ["finished"]


@pytest.mark.slow
def test_the_report_takes_the_best_finite_value_and_says_where(tmp_path):
    from sid.report import write_report

    for seed, values in ((0, ["NaN", 0.3, 0.4]), (1, [0.5, 0.2, 0.25])):
        run = tmp_path / f"lam=0.5_seed={seed}"
        run.mkdir()
        (run / "config.yaml").write_text("loss: {lam: 0.5}\n")
        (run / "metrics.jsonl").write_text("".join(f'{{"nimg": {n}, "fid": {v}}}\n' for n, v in zip((1, 2, 3), values)))
    report = write_report(tmp_path).read_text()
    row = "| lam=0.5 | 0.5 | 2 | 3 | 0.325 ± 0.11 | 0.25 ± 0.071 | 2, 2 | lam=0.5_seed=0: non-finite quality at 1 |"
    assert row in report                                  # the best of seed 0 is 0.3 at 2 images, not its NaN


def test_a_sweep_without_evaluation_says_so_and_reports_the_final_losses(tmp_path, capsys):
    from sid.report import write_report

    for lam, losses in (("0.5", [(64, 2.0, 1.0), (128, 1.5, 0.5)]), ("1.0", [(64, 3.0, 2.0)])):
        run = tmp_path / f"lam={lam}"
        run.mkdir()
        (run / "config.yaml").write_text(f"loss: {{lam: {lam}}}\n")
        (run / "metrics.jsonl").write_text("".join(f'{{"nimg": {n}, "loss_g": {g}, "loss_fake": {f}}}\n'
                                                   for n, g, f in losses))
    (tmp_path / "quality.png").write_bytes(b"an earlier report's")
    report = write_report(tmp_path).read_text()
    assert "no run measured its quality (in-loop evaluation off: eval.every_nimg=0)" in capsys.readouterr().err
    assert "in-loop evaluation was off (`eval.every_nimg` = 0)" in report and "quality.png" not in report
    assert "| lam=0.5 | 0.5 | 1 | 128 | 1.5 | 0.5 | no |" in report
    assert "| lam=1.0 | 1.0 | 1 | 64 | 3 | 2 | no |" in report
    assert not (tmp_path / "quality.png").exists() and (tmp_path / "losses.png").is_file()


@pytest.mark.slow
def test_failed_runs_are_marked_not_dropped(tmp_path, monkeypatch):
    import sid.losses

    real = sid.losses.generator_loss
    monkeypatch.setattr(sid.losses, "generator_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    runs = plan(CONFIG, ["loss.lam=0.5"] + SMALL + ["train.max_nonfinite_steps=2"], tmp_path)
    run_sweep(runs, CONFIG)
    assert plan(CONFIG, ["loss.lam=0.5"] + SMALL, tmp_path)[0]["state"] == "failed"
    from sid.report import write_report

    report = write_report(tmp_path).read_text()
    assert "failed: aborting" in report


@pytest.mark.slow
def test_a_crashed_per_device_process_is_marked_failed(tmp_path, monkeypatch):
    """A child that dies outside SidError (say, out of GPU memory) is marked failed with its log named; one
    stopped by a signal (exit code 130, after a checkpoint) is left to resume."""
    import sid.sweep

    class Crashing:
        returncode = None
        code = 1

        def __init__(self, args, **kwargs):
            kwargs["stdout"].write("Traceback: CUDA out of memory\n")

        def poll(self):
            self.returncode = self.code
            return self.code

    class Interrupted(Crashing):
        code = 130

    monkeypatch.setattr(sid.sweep.subprocess, "Popen", Interrupted)
    monkeypatch.setattr(sid.sweep.time, "sleep", lambda s: None)
    run_sweep(plan(CONFIG, ["loss.lam=0.5,1.0"] + SMALL, tmp_path), CONFIG, devices=2)
    assert {r["state"] for r in plan(CONFIG, ["loss.lam=0.5,1.0"] + SMALL, tmp_path)} == {"new"}

    monkeypatch.setattr(sid.sweep.subprocess, "Popen", Crashing)
    monkeypatch.setattr(sid.sweep.time, "sleep", lambda s: None)
    runs = plan(CONFIG, ["loss.lam=0.5,1.0"] + SMALL, tmp_path)
    run_sweep(runs, CONFIG, devices=2)
    for run in plan(CONFIG, ["loss.lam=0.5,1.0"] + SMALL, tmp_path):
        assert run["state"] == "failed"
        assert "sweep.log" in json.loads((run["dir"] / "status.json").read_text())["error"]
        assert "out of memory" in (run["dir"] / "sweep.log").read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_per_device_sweep_waits_for_its_runs(signum, tmp_path, monkeypatch):
    """Ctrl-C reaches the runs too (the terminal signals the whole process group): the parent waits for them to
    checkpoint before it stops. A scheduler's SIGTERM reaches the parent alone: it passes it on once, then waits."""
    import sid.sweep

    waited, forwarded = [], []

    class Running:
        returncode = None

        def __init__(self, args, **kwargs):
            pass

        def poll(self):
            return None

        def send_signal(self, sig):
            forwarded.append(sig)

        def wait(self):
            waited.append(self)
            return 130

    monkeypatch.setattr(sid.sweep.subprocess, "Popen", Running)
    monkeypatch.setattr(sid.sweep.time, "sleep", lambda seconds: signal.raise_signal(signum))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan(CONFIG, ["loss.lam=0.5,1.0"] + SMALL, tmp_path), CONFIG, devices=2)
    assert len(waited) == 2
    assert forwarded == ([signal.SIGTERM] * 2 if signum == signal.SIGTERM else [])
    assert signal.getsignal(signal.SIGTERM) is handler                                 # restored


@pytest.mark.slow
def test_one_process_per_device_and_dry_run(tmp_path, capsys):
    args = ["sweep", "run", "--config", CONFIG[0], "--out", str(tmp_path), "loss.lam=0.5,1.0", *SMALL]
    assert sid(args + ["--dry-run"]) == 0
    assert capsys.readouterr().out.count("new") == 2 and not any(tmp_path.iterdir())
    out = sid_process(*args, "--devices", "2", timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(r["state"] == "finished" for r in plan(CONFIG, ["loss.lam=0.5,1.0"] + SMALL, tmp_path))


def test_a_run_stopped_by_its_time_budget_counts_as_finished(tmp_path):
    from sid.sweep import status, write_status

    write_status(tmp_path / "a", state="finished", nimg=512)
    write_status(tmp_path / "b", state="finished", nimg=512, stopped_by="max_seconds")
    assert status(tmp_path / "a", 1024) == "new" and status(tmp_path / "b", 1024) == "finished"


def test_report_baselines_are_name_value_pairs(tmp_path, capsys):
    from sid.commands.sweep import parse_baselines

    assert parse_baselines(["teacher, Heun 35 NFE=31.25", "a=b=1"]) == {"teacher, Heun 35 NFE": 31.25, "a=b": 1.0}
    assert sid(["sweep", "report", str(tmp_path), "--baseline", "teacher"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
    assert sid(["sweep", "report", str(tmp_path / "typo")]) == 2
    assert "no sweep folder at" in capsys.readouterr().err
    assert sid(["sweep", "report", str(tmp_path)]) == 2
    assert "holds no runs" in capsys.readouterr().err
