"""SiD-DiT's few-step generator (sid/steps.py): K = 1 is SiD's generator; K steps are the official loop, written out
here in each teacher's own form (SiD-DiT's flow latents, SiD-LSG's add_noise on a VP schedule) from the raw network;
only the last step takes gradients; a run drawing its step count each iteration resumes bit-identically; the export
keeps K."""

import math

import pytest
import torch
from tiny_pipelines import teacher_of

from conftest import assert_resumed_exactly
from sid.config import load_config
from sid.generator import OneStepGenerator
from sid.steps import few_step, step_sigmas

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a cat", "a red dog"]


def test_one_step_is_sids_generator_exactly(tiny_pipeline):
    teacher = teacher_of(tiny_pipeline("sd"))
    z, cond = torch.randn(2, *teacher.shape), teacher.encode(PROMPTS)
    with torch.no_grad():
        ours = OneStepGenerator(teacher.denoiser, teacher.shape, 2.5)(z, cond)
        expected = teacher.denoiser(2.5 * z, torch.full((2,), 2.5), cond)
    assert torch.equal(ours, expected)


def official_flow_loop(transformer, z, cond, steps, renoise, fresh):
    """SiD-DiT's sid_dit_generate on SD3 from init_timestep 999 (t = 1), transcribed: t_i = (999 (1 − i/K)) / 999,
    latents = (1 − t) D + t noise, D = latents − t v(latents, 1000 t)."""
    d, first = torch.zeros_like(z), z
    latents, t = None, None
    for i in range(steps):
        if renoise == "fresh":
            noise = z if i == 0 else fresh[i - 1]
        elif renoise == "ddim":
            noise = z if i == 0 else (latents - (1 - t) * d) / t
        else:
            noise = first
        t = 999 * (1 - i / steps) / 999
        latents = (1 - t) * d + t * noise
        v = transformer(latents, timestep=torch.full((len(z),), 1000 * t), encoder_hidden_states=cond["text"],
                        pooled_projections=cond["pooled"]).sample
        d = latents - t * v
    return d


def official_vp_loop(unet, alphas_cumprod, z, cond, steps, fresh):
    """SiD-LSG's sid_sd_sampler from init_timestep 625 (fresh noise), transcribed: t_i = (625 (1 − i/K)).long(),
    latents = add_noise(D, noise, t_i), D = (latents − sqrt(1 − ā) ε) / sqrt(ā)."""
    d = torch.zeros_like(z)
    for i in range(steps):
        noise = z if i == 0 else fresh[i - 1]
        k = int((torch.tensor(625) * (1 - i / steps)).to(torch.long))
        a = alphas_cumprod[k]
        latents = a.sqrt() * d + (1 - a).sqrt() * noise
        eps = unet(latents, torch.full((len(z),), k), encoder_hidden_states=cond["text"]).sample
        d = (latents - (1 - a).sqrt() * eps) / a.sqrt()
    return d


@pytest.mark.parametrize("renoise", ["fresh", "fixed", "ddim"])
def test_k_steps_on_a_flow_teacher_are_sid_dits_loop(tiny_pipeline, renoise):
    """From t = 1 (σ_init = ∞) on SD3, 4 steps with each re-noising equal SiD-DiT's loop on the raw transformer."""
    teacher = teacher_of(tiny_pipeline("sd3"))
    z = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(0))
    fresh = list(torch.randn(3, 2, *teacher.shape, generator=torch.Generator().manual_seed(1)))
    cond = teacher.encode(PROMPTS)
    generator = OneStepGenerator(teacher.denoiser, teacher.shape, math.inf, steps=4, renoise=renoise)
    with torch.no_grad():
        ours = generator(z, cond, noise=fresh)
        expected = official_flow_loop(teacher.denoiser.net.transformer, z, cond, 4, renoise, fresh)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert step_sigmas(teacher.denoiser, math.inf, 4)[1:] == pytest.approx([3.0, 1.0, 1 / 3])     # t = 3/4, 1/2, 1/4


def test_k_steps_on_a_vp_teacher_are_sid_lsgs_sampler(tiny_pipeline):
    """From timestep 625 on SD 1.x, 4 steps (fresh noise) equal SiD-LSG's sampler on the raw UNet, its timesteps
    625, 468, 312, 156 truncated as it truncates them."""
    teacher = teacher_of(tiny_pipeline("sd"))
    sigma_init = float(teacher.timestep_sigmas()[625])
    z = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(0))
    fresh = list(torch.randn(3, 2, *teacher.shape, generator=torch.Generator().manual_seed(1)))
    cond = teacher.encode(PROMPTS)
    scheduler = diffusers.DDPMScheduler.from_pretrained(tiny_pipeline("sd") / "scheduler")
    with torch.no_grad():
        ours = OneStepGenerator(teacher.denoiser, teacher.shape, sigma_init, steps=4)(z, cond, noise=fresh)
        expected = official_vp_loop(teacher.denoiser.net.unet, scheduler.alphas_cumprod, z, cond, 4, fresh)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    table = teacher.timestep_sigmas()
    assert step_sigmas(teacher.denoiser, sigma_init, 4) == [float(table[k]) for k in (625, 468, 312, 156)]


def test_only_the_last_step_takes_gradients():
    """The generator's gradient is the last step's alone: the same as that step run from the earlier steps'
    (detached) output, and no earlier network call records a graph."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    calls = []

    def denoiser(x, sigma, labels=None):
        calls.append(torch.is_grad_enabled())
        return x / (1 + sigma[:, None] ** 2) + net(x)

    z = torch.randn(8, 4)
    sigmas = step_sigmas(denoiser, 2.5, 3)
    few_step(denoiser, z, sigmas, "fixed").square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    assert calls == [False, False, True]
    net.zero_grad()
    with torch.no_grad():
        d = few_step(denoiser, z, sigmas[:2], "fixed")
    denoiser(d + sigmas[2] * z, torch.full((8,), sigmas[2])).square().sum().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))


def toy(tmp_path, name, total, *extra):
    return load_config([], ["teacher.analytic.student_width=32", "teacher.analytic.student_fit_steps=20",
                            "optim.batch=64", f"train.total_nimg={total}", "train.log_every_nimg=128",
                            "train.sample_every_nimg=100000", "train.ckpt_every_nimg=128",
                            f"train.run_dir={tmp_path / name}", "train.progress=false", "train.tracker=none",
                            "ema.halflife_nimg=500", "generator.steps=3", "generator.random_steps=true", *extra])


def test_a_few_step_run_drawing_its_steps_resumes_exactly_and_exports_k(tmp_path):
    """generator.steps=3 with a step count drawn each iteration: a run stopped at 128 images and resumed to 256
    ends bit-identical to an uninterrupted one; the export records K and its re-noising and samples with them."""
    from sid.generator import load_generator
    from sid.trainer import drawn_steps, train

    whole = train(toy(tmp_path, "whole", 256))
    train(toy(tmp_path, "split", 128))
    resumed = train(toy(tmp_path, "split", 256), resume="auto")
    assert_resumed_exactly(whole, resumed)
    drawn = set()
    for step in range(12):
        whole.step = step
        drawn.add(drawn_steps(whole))
    assert drawn <= {1, 2, 3} and len(drawn) > 1
    loaded = load_generator(tmp_path / "whole" / "generator")
    assert (loaded.steps, loaded.renoise) == (3, "fresh")
    torch.testing.assert_close(loaded.sample_seeds(range(4)), whole.ema.model.sample_seeds(range(4)))
    assert not torch.equal(loaded.sample_seeds(range(4)), loaded.sample_seeds(range(4), steps=1))


def test_the_export_of_a_few_step_generator_samples_k_steps(tiny_pipeline, tmp_path):
    """SiDPipeline of a 2-step (fixed noise) SD generator: its config's steps, its images the generator's."""
    from sid import SiDPipeline
    from sid.generator import export_generator

    teacher = teacher_of(tiny_pipeline("sd"))
    generator = OneStepGenerator(teacher.denoiser, teacher.shape, float(teacher.timestep_sigmas()[625]), 2, "fixed")
    export_generator(generator, teacher.spec, tmp_path / "g", components=teacher.components())
    pipe = SiDPipeline.from_pretrained(tmp_path / "g")
    z = torch.randn(2, *teacher.shape)
    with torch.no_grad():
        expected = generator(z, teacher.encode(PROMPTS))
    assert (pipe.config.steps, pipe.config.renoise) == (2, "fixed")
    torch.testing.assert_close(pipe(PROMPTS, latents=z, output_type="latent").images, expected)
    assert "2 network evaluations per sample" in (tmp_path / "g" / "README.md").read_text()
