"""A generator as a LoRA on its teacher (sid/teachers/diffusers/exchange.py, `sid export-lora`), loaded by stock
diffusers: a LoRA student's adapter exactly, its α honoured; a full student's difference as its truncated SVD, the
error what Eckart–Young says it is.

Tolerances: fused weights W + (α/r) B A against sid's merged W in float32 differ by the rounding of one product and
sum, ~1e-7 relative (bound 1e-6); an SVD of a float32 difference that is rank 2 up to float32 rounding of the
weights (|W| ~ 0.1, ulp ~1e-8, ‖Δ‖ ~ the weights') recovers it to ~1e-6 relative (bound 1e-5).
"""

import copy
import math
import subprocess
import sys

import diffusers
import pytest
import torch
from tiny_pipelines import save_tiny_sd

from sid.cli import main as sid_main
from sid.config import load_config
from sid.errors import SidError
from sid.teachers.diffusers.exchange import LORA_FILE, apply_lora, extract_lora, layers, lora_pipeline, write_lora

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")


LORA_RUN = """
import sys, torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
teacher, lora, export = sys.argv[1:4]
pipe = DiffusionPipeline.from_pretrained(teacher)
pipe.load_lora_weights(lora)
pipe.scheduler = EulerDiscreteScheduler.from_pretrained(export, subfolder="scheduler")
call = dict(num_inference_steps=1, guidance_scale=1.0, output_type="pt")
seeded = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]
lora_images = pipe(["a cat", "a red dog"], generator=seeded(), **call).images
images = DiffusionPipeline.from_pretrained(export)(["a cat", "a red dog"], generator=seeded(), **call).images
assert not any(m == "sid" or m.startswith("sid.") for m in sys.modules)
print(float((lora_images - images).abs().max()))
"""


def fused_unet(teacher_folder, lora_folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(teacher_folder, safety_checker=None)
    pipe.load_lora_weights(lora_folder)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe.unet


def assert_same_weights(a, b, rtol):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert (x - y).abs().max() <= rtol * max(y.abs().max(), 1e-3), name


def test_a_lora_students_adapter_loads_in_stock_diffusers_with_its_alpha(tmp_path, capsys):
    """A LoRA generator (rank 2, α 4: scale 2) trained on a tiny SD teacher, `sid export-lora` of its run:
    ``load_lora_weights`` + ``fuse_lora`` on the teacher's own pipeline give the export's UNet."""
    from sid.trainer import train

    teacher = save_tiny_sd(tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red dog\n")
    train(load_config([], [
        "teacher.kind=diffusers", f"teacher.diffusers.path={teacher}", f"conditions.prompts={prompts}",
        "optim.batch=2", "optim.batch_gpu=2", "train.total_nimg=4", "train.log_every_nimg=4",
        "train.sample_every_nimg=4", "train.ckpt_every_nimg=4", "train.num_samples=2",
        f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.tracker=none", "generator.t_init=625",
        "lora.generator=true", "lora.fake_score=true", "lora.rank=2", "lora.alpha=4", "lora.save_adapter=true",
        "optim.g_lr=1e-2", "optim.fake_lr=1e-2"]))
    assert sid_main(["export-lora", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "LoRA of rank 2 (exact)" in printed
    lora = tmp_path / "run" / "generator" / "lora"
    assert (lora / LORA_FILE).is_file() and "α 4" in (lora / "README.md").read_text()
    export = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "run" / "generator", subfolder="unet")
    student = fused_unet(teacher, lora)
    teacher_unet = diffusers.UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    assert max((a - b).abs().max() for a, b in zip(export.parameters(), teacher_unet.parameters())) > 1e-4
    assert_same_weights(student, export, 1e-6)
    relative = float(printed.split("differ from the generator's by ")[1].split(" ")[0])
    assert relative < 1e-5                                       # the LoRA generator's samples are the export's
    # the card's call, in a process without sid: the teacher's pipeline with the LoRA draws the export's images
    export_folder = tmp_path / "run" / "generator"
    done = subprocess.run([sys.executable, "-c", LORA_RUN, str(teacher), str(lora), str(export_folder)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-5                 # images in [0, 1]
    # decomposed again at its own rank, the merged student's difference is that LoRA (rank ≤ 2 by construction)
    assert sid_main(["export-lora", str(tmp_path / "run"), "--rank", "2", "--out", str(tmp_path / "svd")]) == 0
    printed = capsys.readouterr().out
    assert float(printed.split("SVD error ")[1].split(" ")[0]) < 1e-5
    assert_same_weights(fused_unet(teacher, tmp_path / "svd"), export, 1e-5)


@pytest.fixture(scope="module")
def sd_unets(tmp_path_factory):
    """A tiny SD UNet and a student of it: every Linear and Conv2d weight moved by a rank-2 ΔW of the weights'
    size, and one bias moved (which no LoRA carries)."""
    folder = save_tiny_sd(tmp_path_factory.mktemp("sd"))
    teacher = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    student, deltas = copy.deepcopy(teacher), {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in layers(student).items():
            out, rest = layer.weight.shape[0], layer.weight[0].numel()
            u, v = torch.randn(out, 2, generator=g), torch.randn(2, rest, generator=g)
            delta = (u @ v).reshape(layer.weight.shape) * layer.weight.std() / math.sqrt(2)
            layer.weight += delta
            deltas[name] = delta
        student.conv_in.bias += 0.1
    return folder, teacher, student, deltas


def test_a_rank_r_difference_is_recovered_and_a_bias_is_reported(sd_unets, tmp_path):
    folder, teacher, student, _ = sd_unets
    state, config, report = extract_lora(student, teacher, rank=2)
    assert report["svd_error"] < 1e-5 and report["worst_layer"] < 1e-5
    assert report["not_carried"] == ["conv_in.bias"] and report["not_carried_share"] > 0
    assert config["r"] == config["lora_alpha"] == 2 and set(config["target_modules"]) == set(layers(student))
    rebuilt = apply_lora(copy.deepcopy(teacher), state, config)
    for name, layer in layers(rebuilt).items():
        torch.testing.assert_close(layer.weight, layers(student)[name].weight, rtol=1e-5, atol=1e-6)
    write_lora(tmp_path / "lora", *lora_pipeline("StableDiffusionPipeline"), state, config, "card")
    for name, layer in layers(fused_unet(folder, tmp_path / "lora")).items():
        torch.testing.assert_close(layer.weight, layers(rebuilt)[name].weight, rtol=1e-6, atol=1e-7)


def test_a_truncated_svd_loses_what_eckart_young_says(sd_unets):
    """At rank 1 the error is the second singular values' share of ‖ΔW‖, from each layer's ΔW computed here."""
    _, teacher, student, _ = sd_unets
    _, _, report = extract_lora(student, teacher, rank=1)
    lost = total = worst = 0.0
    for name, layer in layers(student).items():
        s = torch.linalg.svdvals((layer.weight.double() - layers(teacher)[name].weight.double()).detach().flatten(1))
        lost, total = lost + float(s[1:].square().sum()), total + float(s.square().sum())
        worst = max(worst, float(s[1:].norm() / s.norm()))
    assert math.isclose(report["svd_error"], math.sqrt(lost / total), rel_tol=1e-9)
    assert math.isclose(report["worst_layer"], worst, rel_tol=1e-9) and report["svd_error"] > 0.1


def test_what_has_no_lora_form_is_one_line(tmp_path, capsys):
    with pytest.raises(SidError, match="no LoRA form"):
        lora_pipeline(None)
    with pytest.raises(SidError, match="no LoRA form"):
        lora_pipeline("PixArtAlphaPipeline")
    assert sid_main(["export-lora", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no generator.json" in err
    teacher = diffusers.UNet2DConditionModel.from_pretrained(save_tiny_sd(tmp_path / "sd"), subfolder="unet")
    with pytest.raises(SidError, match="equal the teacher's"):
        extract_lora(teacher, teacher, rank=4)
