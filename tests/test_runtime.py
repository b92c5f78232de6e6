"""The run infrastructure both trainers share (sid/runtime.py): the metrics file, interval arithmetic, per-step
seeds, the NaN policy, signals."""

import json
import signal

import pytest
import torch
from accelerate import Accelerator

from sid.errors import SidError
from sid.runtime import (
    GracefulStop,
    MetricsLogger,
    NonFiniteGuard,
    best_record,
    check_launch,
    crossed,
    keep_finite,
    precision_policy,
    sanitize_grads,
    step_seed,
    truncate_records,
)


def test_progress_bar_of_a_time_budgeted_run_counts_its_seconds(tmp_path, monkeypatch, capsys):
    """Images against train.total_nimg, or this session's seconds against train.max_seconds (so the bar has a
    percentage and an ETA), moved at every step, and saying what the run does between steps."""
    import sid.runtime

    clock = iter(range(1000, 10**6, 30))
    monkeypatch.setattr(sid.runtime.time, "time", lambda: next(clock))
    for budget, total in ((0, 1024), (240, 240)):
        logger = MetricsLogger(Accelerator(cpu=True), tmp_path, {"loss": "mean"}, total_nimg=1024,
                               time_budget=budget)
        assert logger.bar.total == total
        logger.tick(64)
        assert logger.bar.n == (30 if budget else 64)
        with logger.doing("drawing sample grids"):
            assert logger.bar.desc.startswith("drawing sample grids")
        assert logger.bar.desc.startswith("training")
        logger.close()
    err = capsys.readouterr().err
    assert "240 s budget" in err and "left" in err and "drawing sample grids" in err


def test_an_interval_reports_means_sums_and_step_counts(tmp_path):
    logger = MetricsLogger(Accelerator(cpu=True), tmp_path, {"loss": "mean", "dropped": "sum", "bad": "steps"},
                           total_nimg=100, progress=False)
    for loss, dropped, bad in ((1.0, 2, True), (3.0, 0, False), (5.0, 1, True)):
        logger.add(loss=torch.tensor(loss), dropped=torch.tensor(dropped), bad=torch.tensor(bad))
    record = logger.flush(48, 3, ema_beta=0.5)
    assert (record["loss"], record["dropped"], record["bad"], record["ema_beta"]) == (3.0, 3, 2, 0.5)
    logger.add(loss=torch.tensor(7.0), dropped=torch.tensor(0), bad=torch.tensor(False))
    assert logger.flush(64, 4)["loss"] == 7.0                                       # a new interval
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nimg"] for r in lines] == [48, 64] and all(r["seconds"] >= 0 and "img_per_s" in r for r in lines)
    logger.close()


def test_a_diverged_mean_is_written_as_it_is(tmp_path):
    """A loss that reached ±inf is the interval's mean as it is, while the counts stay counts."""
    logger = MetricsLogger(Accelerator(cpu=True), tmp_path, {"loss": "mean", "dropped": "sum", "bad": "steps"},
                           total_nimg=100, progress=False)
    logger.add(loss=torch.tensor(float("inf")), dropped=torch.tensor(3), bad=torch.tensor(True))
    record = logger.flush(16, 1)
    assert record["loss"] == float("inf") and (record["dropped"], record["bad"]) == (3, 1)
    logger.close()


def test_records_past_a_restart_and_torn_lines_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"nimg": 16, "fid": 3.0}\n{"nimg": 32, "fid": 2.0}\n{"nimg": 48, "fid": 1.0}\n{"nimg": 6')
    truncate_records(path, 32)
    assert [json.loads(line)["nimg"] for line in path.read_text().splitlines()] == [16, 32]
    assert best_record(path, "fid") == 2.0 and best_record(path, "swd") == float("inf")


def test_intervals_and_seeds():
    assert crossed(256, 64, 256) and not crossed(320, 64, 256) and crossed(300, 64, 256)
    seeds = {step_seed(s, r, k) for s in range(3) for r in range(3) for k in range(50)}
    assert len(seeds) == 450 and all(0 <= s < 2**63 for s in seeds)


def test_non_finite_samples_are_dropped_and_gradients_sanitised():
    losses, dropped = keep_finite(torch.tensor([1.0, float("nan"), float("inf"), 2.0]))
    assert losses.tolist() == [1.0, 0.0, 0.0, 2.0] and int(dropped) == 2
    net = torch.nn.Linear(2, 1)
    net.weight.grad = torch.tensor([[float("nan"), float("inf")]])
    net.bias.grad = torch.tensor([-float("inf")])
    assert sanitize_grads(net)
    assert net.weight.grad.tolist() == [[0.0, 1e5]] and net.bias.grad.tolist() == [-1e5]
    net.weight.grad.zero_()
    net.bias.grad.zero_()
    assert not sanitize_grads(net)


def test_a_streak_of_non_finite_steps_aborts_with_one_line(tmp_path):
    acc = Accelerator(cpu=True)
    guard = NonFiniteGuard(3, acc.device, tmp_path)
    for bad in (True, True, False, True, True):
        guard.update(torch.tensor(bad))
    guard.check(acc)                                                             # the longest streak is 2
    guard.update(torch.tensor(True))
    with pytest.raises(SidError, match=r"aborting: 3 consecutive steps .*train.max_nonfinite_steps=3.*kept"):
        guard.check(acc)


def test_a_signal_asks_to_stop_and_a_second_stops_at_once():
    acc = Accelerator(cpu=True)
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.agreed(acc, sync_point=True)
        signal.raise_signal(signal.SIGTERM)
        assert stop.agreed(acc, sync_point=False)                               # one process: at once
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_accelerates_mixed_precision_is_honoured_or_refused():
    """``accelerate launch --mixed_precision`` (flag or config file) selects sid's bf16 mode or contradicts the
    config in one line; it never leaves prepared modules in bf16 and the rest in fp32."""
    from types import SimpleNamespace

    def launched(mode, device="cpu"):
        return SimpleNamespace(mixed_precision=mode, device=torch.device(device))

    assert precision_policy("auto", launched("no")) == (False, "train.precision=auto")
    assert precision_policy("auto", launched("no", "cuda")) == (True, "train.precision=auto")
    assert precision_policy("bf16", launched("no")) == (True, "train.precision=bf16")
    assert precision_policy("auto", launched("bf16")) == (True, "accelerate's mixed_precision=bf16")
    assert precision_policy("bf16", launched("bf16"))[0]
    with pytest.raises(SidError, match="mixed_precision=bf16 contradicts train.precision=fp32: launch with "
                                       "--mixed_precision no"):
        precision_policy("fp32", launched("bf16"))
    for mode in ("fp16", "fp8"):
        with pytest.raises(SidError, match=f"mixed_precision={mode} is not one of sid's modes"):
            precision_policy("auto", launched(mode))


def test_a_launch_that_runs_fewer_processes_than_asked_is_said():
    from types import SimpleNamespace

    one = SimpleNamespace(num_processes=1)
    assert check_launch(one, {}) is None                                           # python train.py
    assert check_launch(SimpleNamespace(num_processes=2), {"WORLD_SIZE": "2"}) is None
    with pytest.raises(SidError, match="started 2 processes, but Accelerate joined none.*ACCELERATE_USE_CPU=1"):
        check_launch(one, {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"})          # --multi_gpu with no GPU
    # a MULTI_CPU config file with num_processes: 2 and no mpirun: accelerate starts one process
    line = check_launch(one, {"MASTER_ADDR": "127.0.0.1", "ACCELERATE_MIXED_PRECISION": "no"})
    assert line.startswith("warning: accelerate launch was asked for several processes, but one runs")
