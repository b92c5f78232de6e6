"""The speed settings (`perf`, precision) and the throughput benchmark: FLOP counting, one-step agreement of
fast and reference settings (CPU parts everywhere, the full fast mode where a GPU exists), the benchmark table."""

import json

import pytest
import torch
from accelerate import Accelerator

from conftest import TINY_UNET
from eval import bench_speed
from sid.config import load_config
from sid.errors import SidError
from sid.maintenance import save_sample_grid
from sid.run import build, use_compile
from sid.trainer import iteration, train

TINY = ["teacher.kind=diffusers", f"teacher.diffusers.unet_config={json.dumps(TINY_UNET).replace(' ', '')}",
        "teacher.diffusers.prediction_type=edm", "optim.batch=16", "train.progress=false", "train.tracker=none"]
EXACT = ["train.precision=fp32", "perf.tf32=false", "perf.fused_adam=false", "perf.teacher_bf16=false",
         "perf.channels_last=false", "perf.compile=false", "perf.grad_checkpointing=false"]


def test_flop_counter_counts_a_known_matmul():
    layer = torch.nn.Linear(64, 32, bias=False)
    assert bench_speed.count_flops(lambda: layer(torch.randn(8, 64))) == 2 * 8 * 64 * 32


def test_an_iteration_costs_eleven_forwards(tmp_path):
    """Fake step: G forward, f_ψ forward + weight and input backward (4); generator step: G forward + backward
    (3), f_φ and f_ψ forward + input backward (4). Checks the counting, and that no network runs twice."""
    flops = bench_speed.network_flops([], TINY + [f"train.run_dir={tmp_path}"])
    assert 10.5 < flops["iteration_flop_per_img"] / flops["forward_flop"] < 11.5
    # loss.reuse_generator_batch: the fake step fits the generator step's samples, one G forward fewer
    flops = bench_speed.network_flops([], TINY + [f"train.run_dir={tmp_path}", "loss.reuse_generator_batch=true"])
    assert 9.5 < flops["iteration_flop_per_img"] / flops["forward_flop"] < 10.5


def one_step(overrides, tmp_path, device="cpu"):
    """Losses and gradients of one training iteration (same seed, same batch), from a fake score moved 2% away
    from the teacher, as it is after some training. (At the very start f_ψ = f_φ, so in bf16 f_φ - f_ψ and the
    generator's gradient are rounding noise, and comparing them with fp32 would test nothing.)"""
    cfg = load_config([], TINY + overrides + [f"train.run_dir={tmp_path}"])
    run = build(cfg, Accelerator(cpu=device == "cpu"), resume=None)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in run.fake_score.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=noise).to(p.device))
    grads = {}
    for name, opt, net in (("fake", run.opt_fake, run.fake_score), ("g", run.opt_g, run.generator)):
        def record(*args, _step=opt.step, _name=name, _net=net, **kwargs):
            grads[_name] = torch.cat([p.grad.flatten().float() for p in _net.parameters()])
            return _step(*args, **kwargs)
        opt.step = record
    loss_fake, loss_g, dropped, bad = iteration(run)
    assert not bad and int(dropped) == 0
    return float(loss_fake), float(loss_g), grads


def assert_agree(a, b, loss_rtol, min_cosine, compare_loss_g=True):
    """Loss values within ``loss_rtol`` and gradients at cosine > ``min_cosine``. The generator loss's value is
    a sum of terms δ·(f_φ - x_g) of both signs with small δ = f_φ - f_ψ, so in bf16 only its gradient compares."""
    assert a[0] == pytest.approx(b[0], rel=loss_rtol)
    if compare_loss_g:
        assert a[1] == pytest.approx(b[1], rel=loss_rtol)
    for name in ("fake", "g"):
        cosine = torch.nn.functional.cosine_similarity(a[2][name], b[2][name], dim=0)
        assert cosine > min_cosine, (name, float(cosine))


def test_fp32_speed_settings_change_nothing_but_rounding(tmp_path):
    reference = one_step(EXACT, tmp_path / "a")
    fast = one_step(EXACT + ["perf.fused_adam=true", "perf.channels_last=true", "perf.grad_checkpointing=true"],
                    tmp_path / "b")
    assert_agree(reference, fast, 1e-4, 0.9999)


def test_bf16_agrees_with_fp32_within_bf16_tolerance(tmp_path):
    reference = one_step(EXACT, tmp_path / "a")
    bf16 = one_step(EXACT + ["train.precision=bf16", "perf.teacher_bf16=true"], tmp_path / "b")
    assert_agree(reference, bf16, 1e-2, 0.97, compare_loss_g=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_mode_agrees_with_reference_on_a_gpu(tmp_path):
    reference = one_step(EXACT, tmp_path / "a", device="cuda")
    fast = one_step(bench_speed.mode_overrides("fast", 16) + ["optim.batch_gpu=null"], tmp_path / "b", "cuda")
    assert_agree(reference, fast, 1e-2, 0.97, compare_loss_g=False)


def test_precision_auto_is_fp32_on_cpu_and_teacher_stays_fp32(tmp_path):
    cfg = load_config([], TINY + [f"train.run_dir={tmp_path}"])
    run = build(cfg, Accelerator(cpu=True), resume=None)
    assert cfg.train.precision == "auto" and not run.bf16
    assert all(p.dtype == torch.float32 for p in run.teacher.denoiser.parameters())
    cfg = load_config([], TINY + [f"train.run_dir={tmp_path}", "train.precision=bf16"])
    run = build(cfg, Accelerator(cpu=True), resume=None)
    assert all(p.dtype == torch.bfloat16 for p in run.teacher.denoiser.net.parameters())
    assert all(p.dtype == torch.float32 for p in run.fake_score.parameters())     # fp32 masters


def test_grad_checkpointing_of_other_backbones_changes_nothing_but_memory(tmp_path, monkeypatch):
    """Backbones that are not diffusers UNets (here the MLPs of an analytic teacher's students; EDM pickles and
    networks of your own alike) are checkpointed whole: the iteration runs them through
    torch.utils.checkpoint, and its losses and gradients are those of the plain iteration."""
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    toy = EXACT + ["teacher.kind=analytic", "teacher.analytic.student_fit_steps=10"]
    reference = one_step(toy, tmp_path / "a")
    assert not calls
    checkpointed = one_step(toy + ["perf.grad_checkpointing=true"], tmp_path / "b")
    assert len(calls) >= 3                             # the fake score (twice) and the generator, at least
    assert_agree(reference, checkpointed, 1e-6, 0.999999)


@pytest.mark.slow
def test_bench_writes_its_table(tmp_path):
    args = ["--modes", "reference,no_accumulation,fused_adam", "--warmup", "1", "--iters", "2",
            "--out", str(tmp_path / "out"), *TINY]
    assert bench_speed.main(args) == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["mode"] for r in result["rows"]] == ["reference", "no_accumulation", "fused_adam"]
    assert [r["batch_gpu"] for r in result["rows"]] == [4, None, None]
    assert all(r["finite"] and r["img_per_s"] > 0 and 0 < r["peak_fraction"] < 1 for r in result["rows"])
    assert "| reference | 16 (4) |" in (tmp_path / "out" / "bench.md").read_text()
    assert bench_speed.main(["--modes", "warp_drive", *TINY]) == 2


@pytest.mark.slow
def test_compiled_networks_agree_with_eager(tmp_path, monkeypatch):
    """perf.compile: TorchDynamo captures each network whole (no graph breaks, which would cost speed on a GPU)
    and one iteration changes nothing but rounding. The inductor backend is swapped for aot_eager to keep this
    fast on a CPU; capture and autograd of the captured graphs are the same."""
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    reference = one_step(EXACT, tmp_path / "a")
    compiled = one_step(EXACT + ["perf.compile=true"], tmp_path / "b")
    assert counters["stats"]["unique_graphs"] > 0 and counters["frames"]["ok"] == counters["frames"]["total"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_agree(reference, compiled, 1e-4, 0.9999)
    # the teacher's reference grid (Heun, drawn once per run) runs eagerly instead of compiling another graph
    graphs = counters["stats"]["unique_graphs"]
    cfg = load_config([], TINY + EXACT + ["perf.compile=true", "train.num_samples=4",
                                          f"train.run_dir={tmp_path / 'c'}"])
    (tmp_path / "c").mkdir()
    save_sample_grid(build(cfg, Accelerator(cpu=True), resume=None))
    assert (tmp_path / "c" / "samples" / "teacher.png").is_file()
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_compile_defaults_to_gpus_and_a_failing_compile_names_the_switch(tmp_path, monkeypatch):
    assert load_config([], []).perf.compile is None
    assert use_compile(None, torch.device("cuda")) and not use_compile(None, torch.device("cpu"))
    assert use_compile(True, torch.device("cpu")) and not use_compile(False, torch.device("cuda"))

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler on this machine")

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend=broken_backend))
    torch._dynamo.reset()
    cfg = load_config([], ["perf.compile=true", "teacher.analytic.student_fit_steps=10", "optim.batch=64",
                           "train.total_nimg=64", "train.tracker=none", "train.progress=false",
                           f"train.run_dir={tmp_path}"])
    with pytest.raises(SidError, match=r"torch.compile failed .*no compiler on this machine.*perf.compile=false"):
        train(cfg)
