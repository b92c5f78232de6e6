"""The memory plan (sid/memory.py, `sid train --dry-run`) against what a real run holds, on the CPU."""

import json
import shutil

import pytest
import torch

from conftest import FUSED_BF16_ATTENTION
from sid.config import load_config
from sid.errors import SidError


@pytest.mark.slow
@pytest.mark.skipif(not FUSED_BF16_ATTENTION, reason="the plan counts fused attention, which torch refuses in bf16 "
                                                    "with ATEN_CPU_CAPABILITY below this CPU's")
def test_the_plan_matches_the_measured_peak_within_a_fifth():
    """eval/bench_memory.py on the tiny UNet with attention: the planned weights and Adam moments are the measured
    ones (the counts are exact), and the planned peak (with the activations measured on the meta device) is within
    20% of the peak of a real run's two iterations, in bf16 with LoRA students and activation checkpointing (full
    students in fp32: tests/test_sharding.py, sharded)."""
    from eval.bench_memory import CASES, SMOKE, bench

    rows = bench([], SMOKE, {"LoRA + checkpointing": CASES["LoRA + checkpointing"]}, ["bf16"])
    for row in rows:
        measured, planned = row["measured"], row["planned"]
        print(row["case"], row["precision"], {k: round(planned[k] / measured[k], 3) for k in measured})
        for key in ("weights", "states"):
            assert planned[key] == pytest.approx(measured[key], rel=0.01), (row["case"], key)
        assert planned["peak"] == pytest.approx(measured["peak"], rel=0.2), row["case"]


def test_lora_and_sharding_shrink_the_plan_as_the_counts_say(tmp_path):
    """LoRA students hold their adapters only (base weights shared with the teacher): the students' rows drop
    from the network's size to the adapters'; sharding over 4 processes divides every network state by 4."""
    from eval.bench_memory import SMOKE
    from sid.memory import plan

    base = [*SMOKE, f"train.run_dir={tmp_path}", "optim.batch=8"]
    whole = plan(load_config([], base))
    full = dict(whole.rows)
    lora = dict(plan(load_config([], [*base, "lora.fake_score=true", "lora.generator=true"])).rows)
    sharded = dict(plan(load_config([], base), processes=4, sharded=True).rows)
    network = full["teacher, frozen (bf16)"] / 2                           # parameters
    assert full["generator: weights (fp32)"] == network * 4 and full["fake score: Adam moments"] == network * 8
    adapters = lora["generator: adapters (fp32)"] / 4
    assert 0 < adapters < network / 10 and lora["fake score: Adam moments"] == adapters * 8
    assert lora["teacher, frozen (bf16)"] == full["teacher, frozen (bf16)"]
    for what in ("teacher, frozen (bf16)", "generator: weights (fp32)", "generator: EMA weights",
                 "fake score: Adam moments", "gradients (one student at a time)"):
        assert sharded[what] == full[what] / 4, what
    per_sample, per_step = whole.activation                                # micro-batch 8 -> 2 per process
    assert sharded["activations, one generator step"] == per_step + 2 * per_sample


@pytest.mark.slow
def test_dry_run_prints_the_plan_of_a_latent_pipeline_without_reading_its_weights(tiny_pipeline, tmp_path,
                                                                                   capsys):
    """`sid train --dry-run` on an SD3 folder whose weight files are garbage: the networks are built from their
    configs on the meta device, so the plan is printed, with advice for a GPU it exceeds; --shard on one process is
    one line."""
    from sid.cli import main as sid

    folder = tmp_path / "sd3"
    shutil.copytree(tiny_pipeline("sd3"), folder)
    for weights in folder.rglob("*.safetensors"):
        weights.write_bytes(b"not weights")
    common = ["train", "--dry-run", "teacher.kind=diffusers", f"teacher.diffusers.path={folder}",
              "loss.guide_teacher=3", "optim.batch=4"]
    assert sid([*common, "--gpu-memory", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert "memory plan, per process (1 process; micro-batch 4):" in out and "VAE and text encoders" in out
    assert "exceeds 0.1 MiB" in out and "perf.grad_checkpointing=true:" in out and "lora.fake_score=true" in out
    assert sid([*common, "--processes", "1", "--shard"]) == 2
    err = capsys.readouterr().err
    assert "sharding splits the networks over 2 or more processes" in err and err.count("\n") == 1


def test_the_plan_counts_what_training_allocates(tmp_path):
    """The plan's counted rows are the sizes of the networks training builds (teacher, students, EMA)."""
    from accelerate import Accelerator

    from eval.bench_memory import SMOKE
    from sid.memory import plan
    from sid.run import build

    cfg = load_config([], [*SMOKE, f"train.run_dir={tmp_path}", "train.precision=fp32", "lora.generator=true"])
    rows = dict(plan(cfg, on_gpu=False).rows)
    run = build(cfg, Accelerator(cpu=True), resume=None)
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)    # noqa: E731
    assert rows["teacher, frozen (fp32)"] == size(run.teacher.denoiser.parameters())
    assert rows["fake score: weights (fp32)"] == size(run.fake_score.parameters())
    assert rows["generator: adapters (fp32)"] == size(p for p in run.generator.parameters() if p.requires_grad)
    assert rows["generator: EMA adapters"] == rows["generator: adapters (fp32)"]
    with pytest.raises(SidError, match="optim.batch=16 is not divisible by the 3 processes"):
        plan(cfg, processes=3)
    assert json.dumps(rows)
    assert torch.is_grad_enabled()


@pytest.mark.slow                                   # a fresh process / the command line
def test_a_plan_after_a_text_teacher_was_loaded_in_the_same_process(tiny_pipeline):
    """In a fresh process whose first device-context construction happens inside transformers' model loading (which
    fixes torch's set of device-aware constructors to wrapped ones), a later plan still builds every network on the
    meta device (``teachers.base.on_meta``)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("from sid.config import load_config\nfrom sid.memory import plan\nfrom tiny_pipelines import teacher_of\n"
              f"teacher_of({str(tiny_pipeline('sd'))!r})\n"
              "print(plan(load_config(['toy_2d'], [])).total > 0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert out.returncode == 0 and out.stdout.strip().endswith("True"), out.stderr[-2000:]


# Published sizes of the networks (parameters), which the shipped configs must build: SD 1.5's UNet 859.52M,
# SD 2.1's 865.91M, SDXL base's 2.567B, SD3 medium's MM-DiT 2.03B, SD3.5 large's 8.1B, FLUX.1's 11.9B.
PUBLISHED = {"stable-diffusion-v1-5/stable-diffusion-v1-5": 859_520_964,
             "stabilityai/stable-diffusion-2-1-base": 865_910_724,
             "stabilityai/stable-diffusion-xl-base-1.0": 2_567_463_684,
             "stabilityai/stable-diffusion-3-medium-diffusers": 2.03e9, "stabilityai/stable-diffusion-3.5-large": 8.1e9,
             "black-forest-labs/FLUX.1-dev": 11.9e9, "black-forest-labs/FLUX.1-schnell": 11.9e9}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_shipped_architectures_build_the_published_networks_offline(hub_id, monkeypatch):
    """A hub id whose architecture ships with sid plans from it, never asking the hub (here: none to ask): its
    network has the published size (exact where the count is published, else to 1%)."""
    from sid.teachers import build_architecture

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", "/nonexistent-cache")
    cfg = load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={hub_id}"])
    size = sum(p.numel() for p in build_architecture(cfg.teacher).denoiser.parameters())
    assert size == PUBLISHED[hub_id] if isinstance(PUBLISHED[hub_id], int) else abs(size / PUBLISHED[hub_id] - 1) < 0.01


@pytest.mark.slow                                   # a fresh process / the command line
def test_every_preset_with_a_hub_teacher_plans_offline(capsys, monkeypatch):
    """`sid train --config P --dry-run` for each shipped preset whose teacher is a hub id names a shipped
    architecture; DiT-XL/2's plan is made offline (a large GPU: the plan alone, no advice)."""
    from sid.cli import main as sid
    from sid.config import preset_names
    from sid.teachers.diffusers.published import shipped

    presets = [name for name in preset_names() if "/" not in name]          # not speed/ and teacher/ configs
    hub_teachers = {name: load_config([name]).teacher for name in presets}
    hub_teachers = {k: t.diffusers.path for k, t in hub_teachers.items() if t.kind == "diffusers" and t.diffusers.path
                    and not t.diffusers.path.startswith("builtin:")}
    assert set(hub_teachers) >= {"sd15_lsg", "sd21_lsg", "sd3_medium_dit", "flux_dev_sid_dit", "dit_xl2_256"}
    assert set(hub_teachers.values()) <= set(shipped())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", "/nonexistent-cache")
    assert sid(["train", "--config", "dit_xl2_256", "--dry-run", "--gpu-memory", "10000"]) == 0
    out = capsys.readouterr().out
    assert "memory plan, per process" in out and "parameters: teacher 749,826,464" in out and "not made" not in out
