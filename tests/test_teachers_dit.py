"""Class-conditional latent teachers (DiTPipeline, sid/teachers/diffusers/families/dit.py) on a tiny pipeline built
from configs: the pipeline's own output reproduced, distillation with guidance inside the loss, the export as a
pipeline."""

import pytest
import torch
from tiny_pipelines import teacher_of

from sid.config import load_config
from sid.guidance import guided
from sid.sampling import euler_sampler

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def dit_folder(tiny_pipeline):
    return tiny_pipeline("dit")


def one_hot(classes):
    return torch.nn.functional.one_hot(torch.tensor(classes), 1000).float()


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_under_guidance_reproduces_the_pipelines_own_images(dit_folder, guidance):
    """sid's Euler sampler on the adapter's denoiser, guided against the null class (the zero one-hot vector:
    DiT's class 1000), from the pipeline's latents, decodes to DiTPipeline's own images. Its scheduler is DDIM
    (η = 0), which is Euler in EDM units on the VP-scaled state: x_edm = x_vp sqrt(1 + σ²), its σ grid the
    timesteps' then 0 (set_alpha_to_one)."""
    teacher = teacher_of(dit_folder)
    pipe = diffusers.DiTPipeline.from_pretrained(dit_folder)
    classes = [3, 917]
    expected = pipe(classes, guidance_scale=guidance, num_inference_steps=5, output_type="pt",
                    generator=torch.Generator().manual_seed(1)).images
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))     # the pipeline's draw
    pipe.scheduler.set_timesteps(5)
    sigmas = torch.cat([teacher.timestep_sigmas()[pipe.scheduler.timesteps].double(), torch.zeros(1).double()])
    denoiser = guided(teacher.denoiser, guidance, teacher.null_condition)
    start = z.double() * (1 + sigmas[0] ** 2).sqrt() / sigmas[0]           # the sampler multiplies by σ_0
    latents = euler_sampler(denoiser, start, sigmas, one_hot(classes))
    ours = (teacher.decode(latents.float()) + 1) / 2
    print(f"max difference at κ = {guidance:g}: {float((ours - expected).abs().max()):.2e}")
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    assert teacher.label_dim == 1000 and teacher.shape == (4, 8, 8) and teacher.spec["pipeline"] == "DiTPipeline"


@pytest.mark.slow
def test_a_dit_distils_with_guidance_resumes_exactly_and_exports_a_pipeline(dit_folder, tmp_path):
    """class labels drawn from conditions.class_probs, κ inside the loss, SiD-LSG-style timesteps; a resumed run
    ends bit-identical; SiDPipeline.from_pretrained(export)(class_labels=...) is the EMA generator, decoded."""
    from sid import SiDPipeline
    from sid.generator import OneStepGenerator
    from sid.trainer import train

    probs = [0.0] * 1000
    probs[3], probs[917] = 0.5, 0.5
    common = ["teacher.kind=diffusers", f"teacher.diffusers.path={dit_folder}", "optim.batch=4",
              "train.log_every_nimg=8", "train.ckpt_every_nimg=8", "train.sample_every_nimg=16", "train.num_samples=4",
              "train.progress=false", "train.tracker=none", f"conditions.class_probs={probs}",
              "loss.guide_teacher=2", "loss.guide_fake=2", "loss.time=timesteps", "loss.fake_loss=native",
              "generator.t_init=500"]
    whole = train(load_config([], common + ["train.total_nimg=16", f"train.run_dir={tmp_path / 'whole'}"]))
    train(load_config([], common + ["train.total_nimg=8", f"train.run_dir={tmp_path / 'split'}"]))
    split = train(load_config([], common + ["train.total_nimg=16", f"train.run_dir={tmp_path / 'split'}"]),
                  resume="auto")
    a, b = whole.ema.model.state_dict(), split.ema.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "samples" / "compare.png").is_file()

    pipe = SiDPipeline.from_pretrained(tmp_path / "whole" / "generator")
    z, _ = OneStepGenerator(whole.teacher.denoiser, (4, 8, 8)).inputs_for_seeds([0, 1])
    images = pipe(class_labels=[3, 917], latents=z, batch_size=2, output_type="pt").images
    with torch.no_grad():
        expected = whole.teacher.decode(whole.ema.model(z, one_hot([3, 917])))
    torch.testing.assert_close(images, expected / 2 + 0.5, rtol=1e-5, atol=1e-5)       # "pt": [0, 1]


@pytest.mark.slow
def test_sid_sample_and_fid_decode_a_dit_generator(dit_folder, tmp_path):
    """`sid sample --classes` and `sid fid gen` on a DiT export: images through the VAE, one per seed."""
    import json

    import numpy as np
    from tiny_pipelines import save_feature_extractor

    from sid.cli import main as sid
    from sid.trainer import train

    train(load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={dit_folder}", "optim.batch=2",
                           "train.total_nimg=2", "train.progress=false", "train.tracker=none",
                           f"train.run_dir={tmp_path / 'run'}"]))
    run = str(tmp_path / "run")
    assert sid(["sample", run, "--seeds", "0-2", "--classes", "7", "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (3, 16, 16, 3)
    assert sid(["sample", run, "--prompt", "a cat", "--out", str(tmp_path / "t.npz")]) == 2
    weights = str(save_feature_extractor(tmp_path / "features.pt"))
    np.savez(tmp_path / "real.npz", images=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8))
    assert sid(["fid", "ref", "--source", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref.npz"),
                "--weights", weights]) == 0
    assert sid(["fid", "gen", run, "--ref", str(tmp_path / "ref.npz"), "--num", "4", "--weights", weights,
                "--json", str(tmp_path / "r.jsonl")]) == 0
    assert np.isfinite(json.loads((tmp_path / "r.jsonl").read_text())["mean"])
    # the teacher too: `sid sample --teacher` and `sid fid teacher` decode its latents
    assert sid(["sample", "--teacher", str(dit_folder), "--classes", "3", "--guidance", "2", "--steps", "3",
                "--solver", "euler", "--seeds", "0-1", "--out", str(tmp_path / "t.npz")]) == 0
    assert np.load(tmp_path / "t.npz")["images"].shape == (2, 16, 16, 3)
    assert sid(["fid", "teacher", "--config", str(dit_folder), "--steps", "2", "--ref", str(tmp_path / "ref.npz"),
                "--num", "4", "--weights", weights]) == 0


def test_the_dit_preset_builds_its_recipe(dit_folder, tmp_path):
    """configs/dit_xl2_256.yaml with the tiny pipeline in its place (DiT's linear schedule): the generator at
    σ_440 ≈ 2.5, timesteps 20..979, ε-MSE fake loss, κ = 1.5 everywhere, α = 1."""
    from accelerate import Accelerator

    from sid.run import build

    cfg = load_config(["dit_xl2_256"], [f"teacher.diffusers.path={dit_folder}", "optim.batch=4", "optim.batch_gpu=2",
                                        f"train.run_dir={tmp_path / 'run'}"])
    run = build(cfg, Accelerator(cpu=True), resume=None)
    assert abs(run.generator.sigma_init - 2.5023) < 1e-3 and run.loss.timesteps == (20, 979)
    assert run.loss.fake_weight is not None and run.loss.lam == 1.0 and run.loss.guide_teacher == 1.5
    assert run.conditions.label_dim == 1000 and run.teacher.null_condition(1).sum() == 0
