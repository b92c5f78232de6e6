"""Sharded training (sid/sharding.py, FSDP2) on two CPU processes (gloo) through `accelerate launch --use_fsdp`, on a
tiny text-conditioned UNet2DConditionModel pipeline: the sharded run equals the unsharded one, its checkpoints are
the unsharded format (a one-process run resumes them), and the generator step's gradients go where they should."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from sid.config import load_config
from sid.errors import SidError

pytestmark = pytest.mark.slow                     # end-to-end runs


def overrides(folder, prompts):
    return ["teacher.kind=diffusers", f"teacher.diffusers.path={folder}", f"conditions.prompts={prompts}",
            "optim.batch=4", "optim.batch_gpu=1", "train.log_every_nimg=4", "train.ckpt_every_nimg=4",
            "train.sample_every_nimg=8", "train.num_samples=2", "train.progress=false", "train.tracker=none",
            "loss.guide_teacher=1.5", "loss.guide_fake=1.5", "optim.g_lr=1e-3", "optim.fake_lr=1e-3",
            "ema.halflife_nimg=8", "perf.fused_adam=false"]


@pytest.fixture(scope="module")
def launched(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    (out / "prompts.txt").write_text("a cat\na red dog\na blue bird\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    env.pop("ACCELERATE_USE_FSDP", None)
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "tests/shard_worker.py"), str(out),
         *overrides(tiny_pipeline("sd"), out / "prompts.txt")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stdout, overrides(tiny_pipeline("sd"), out / "prompts.txt")


def test_a_sharded_run_stopped_and_resumed_equals_the_unsharded_one(launched):
    """Two processes, 8 images: the unsharded (DDP) run straight, the sharded one stopped at 4 and resumed (its
    Adam moments split again from the full state); their last training states (full tensors both) agree to float
    tolerance: the gradients are summed in another order (a reduce-scatter instead of an all-reduce), which Adam's
    normalised steps (lr 1e-3 here) can carry into the weights at a tenth of a step."""
    from sid.checkpoint import list_training_states, load_training_state

    out, stdout, _ = launched
    assert "sharded (FSDP2)" in stdout and "resumed from" in stdout
    ddp, fsdp = (load_training_state(list_training_states(out / name)[-1]) for name in ("ddp", "fsdp"))
    assert ddp["nimg"] == fsdp["nimg"] == 8
    for name in ("generator", "fake_score", "ema"):
        assert set(ddp[name]) == set(fsdp[name]), name
        for key in ddp[name]:
            torch.testing.assert_close(fsdp[name][key], ddp[name][key], rtol=1e-3, atol=1e-4)
    for index, moments in ddp["opt_g"]["state"].items():
        torch.testing.assert_close(fsdp["opt_g"]["state"][index]["exp_avg_sq"], moments["exp_avg_sq"], rtol=1e-2,
                                   atol=1e-8)


def test_the_generator_step_under_sharding_sends_no_gradient_to_the_teacher_or_fake_score(launched):
    """T8 under sharding: no gradient reaches φ's or ψ's parameters, and cutting the input-gradient through
    either changes the generator's gradient (both predictions take part)."""
    out, _, _ = launched
    for rank in (0, 1):
        grads = json.loads((out / f"grads{rank}.json").read_text())
        assert grads["sharded"] and grads["untouched"] and grads["norm"] > 0 and grads["repeatable"]
        assert grads["fake_takes_part"] and grads["teacher_takes_part"]


def test_a_sharded_runs_checkpoint_and_export_are_the_unsharded_ones(launched):
    """The sharded run wrote full tensors (the unsharded format): one process resumes it and trains on, and its
    export loads as a plain generator equal to the state's EMA; sample grids were drawn."""
    from sid.checkpoint import list_training_states, load_training_state
    from sid.generator import load_generator
    from sid.trainer import train

    out, _, common = launched
    state = load_training_state(list_training_states(out / "fsdp")[-1])
    exported = load_generator(out / "fsdp" / "generator")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in state["ema"].items())
    assert (out / "fsdp" / "samples" / "compare.png").is_file()
    resumed = train(load_config([], [*common, f"train.run_dir={out / 'fsdp'}", "train.total_nimg=12"]), resume="auto")
    assert resumed.nimg == 12 and not resumed.sharded


def test_the_memory_plan_of_a_sharded_run_matches_its_measured_peak(launched):
    """eval/bench_memory.py's tiny UNet sharded over the two processes: the planned shards of the weights and Adam's
    moments are the measured ones, and the planned peak is within 20% of the measured one (the largest process's)."""
    out, _, _ = launched
    memory = json.loads((out / "memory0.json").read_text())
    measured, planned = memory["measured"], memory["planned"]
    print({k: round(planned[k] / measured[k], 3) for k in measured})
    for key in ("weights", "states"):
        assert planned[key] == pytest.approx(measured[key], rel=0.01), key
    assert planned["peak"] == pytest.approx(measured["peak"], rel=0.2)


def test_a_sharded_lora_run_stopped_and_resumed_equals_the_unsharded_one(launched):
    """LoRA students over a sharded frozen base (each of the teacher's layers one unit, shared by the three
    networks; the adapters sharded as units of their own): stopped at 4 images and resumed, it ends as the unsharded
    LoRA run within summation order, its states hold the adapters alone, and its export (merged) loads."""
    from sid.checkpoint import list_training_states, load_training_state
    from sid.generator import load_generator

    out, _, _ = launched
    ddp, fsdp = (load_training_state(list_training_states(out / name)[-1]) for name in ("ddp-lora", "fsdp-lora"))
    assert ddp["nimg"] == fsdp["nimg"] == 8
    for name in ("generator", "fake_score", "ema"):
        adapters = {key for key in ddp[name] if "lora_" in key}                 # (DDP's also carry the rule's buffer)
        assert set(fsdp[name]) == adapters and adapters, name
        for key in adapters:
            torch.testing.assert_close(fsdp[name][key], ddp[name][key], rtol=1e-3, atol=1e-4)
    sharded, plain = (load_generator(out / name / "generator").state_dict() for name in ("fsdp-lora", "ddp-lora"))
    assert set(sharded) == set(plain) and not any("lora_" in key for key in plain)          # merged: a plain UNet
    for key in plain:
        torch.testing.assert_close(sharded[key], plain[key], rtol=1e-3, atol=1e-4)


def test_sharding_on_one_process_is_one_line():
    from sid.sharding import check_launch

    with pytest.raises(SidError, match="sharding splits the networks over 2 or more processes"):
        check_launch(1)
