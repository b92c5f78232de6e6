"""The other latent text-to-image families (sid/teachers/diffusers/families/): Stable Diffusion XL (two CLIPs, pooled
embeddings, time ids), Stable Diffusion 3 (MM-DiT on flow matching, two CLIPs and T5, or no T5), PixArt-α / Σ
(T5 with its attention mask, learned variance) and Sana (Gemma 2 after an instruction, a deep-compression VAE),
each on a tiny pipeline built from configs: sid's denoiser is the pipeline's own model, shown against the
pipeline's own output; a short distillation resumes exactly and exports a pipeline that reloads."""

import numpy as np
import pytest
import torch
from tiny_pipelines import teacher_of

from conftest import assert_float32_close, assert_resumed_exactly, assert_trained
from sid.config import load_config
from sid.guidance import guided
from sid.sampling import euler_sampler

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a cat", "a red dog"]
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "sd3-without-t5": "StableDiffusion3Pipeline", "pixart": "PixArtAlphaPipeline",
             "pixart-sigma": "PixArtSigmaPipeline", "sana": "SanaPipeline"}
FLOW = ("sd3", "sd3-without-t5", "sana")
FLOW_SIGMAS = [0.97, 0.8, 0.6, 0.4, 0.2, 0.05]          # flow times below 1 (σ = t / (1 − t) finite), shifted


def pipeline_of(name, folder):
    without = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3-without-t5" else {}
    return getattr(diffusers, PIPELINES[name]).from_pretrained(folder, **without)


def run_pipeline(name, pipe, z, guidance):
    """The pipeline's own latents for PROMPTS from ``z`` in 6 Euler steps at guidance κ, and the noise levels it
    stepped through in EDM units (ending at 0) with the start sid's sampler multiplies by the first."""
    kwargs = {"use_resolution_binning": False, "clean_caption": False} if name.startswith(("pixart", "sana")) else {}
    if name == "sana":
        kwargs.update(height=32, width=32)
    if name in FLOW:
        kwargs["sigmas"] = FLOW_SIGMAS
    latents = pipe(PROMPTS, num_inference_steps=6, guidance_scale=guidance, latents=z.clone(), output_type="latent",
                   **kwargs).images
    if name in FLOW:                                            # flow time t -> σ = t / (1 − t); x_t = (1 − t) x
        t = pipe.scheduler.sigmas.double()
        sigmas = t / (1 - t)
        return latents, sigmas, z / t[0]                        # x = z / (1 − t0) = σ0 (z / t0)
    sigmas = pipe.scheduler.sigmas.double()
    return latents, sigmas, z * pipe.scheduler.init_noise_sigma / sigmas[0]


@pytest.mark.parametrize("name", list(PIPELINES))
def test_euler_under_guidance_reproduces_the_pipelines_own_latents(tiny_pipeline, name):
    """sid's Euler sampler on the adapter's denoiser, under CFG against the family's null condition, from the
    pipeline's latents, gives the pipeline's own output (output_type="latent", its Euler or flow-Euler scheduler,
    6 steps, κ = 3) to 1e-4 relative."""
    folder = tiny_pipeline(name)
    teacher, pipe = teacher_of(folder), pipeline_of(name, folder)
    z = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(1))
    expected, sigmas, start = run_pipeline(name, pipe, z, 3.0)
    ours = euler_sampler(guided(teacher.denoiser, 3.0, teacher.null_condition), start, sigmas,
                         teacher.encode(PROMPTS))
    scale = expected.abs().max()
    print(f"{name}: max relative difference {float((ours - expected).abs().max() / scale):.2e}")
    assert (ours - expected).abs().max() / scale < 1e-4
    assert teacher.spec["pipeline"] == PIPELINES[name] and teacher.text_to_image


@pytest.mark.parametrize("name", ["sdxl", "sd3", "pixart"])
def test_one_step_is_the_schedulers_own_prediction(tiny_pipeline, name):
    """At one noise level sid's x0 is the scheduler's: Euler's pred_original_sample (SDXL, PixArt), or the flow
    Euler step from t to 0 (SD3), for the network's output on the pipeline's own encoding."""
    folder = tiny_pipeline(name)
    teacher, pipe = teacher_of(folder), pipeline_of(name, folder)
    cond = teacher.encode(PROMPTS)
    scheduler = pipe.scheduler
    if name == "sd3":
        scheduler.set_timesteps(sigmas=[0.6])                   # shifted: t = 0.818, then 0
        t = scheduler.sigmas[0]
        sigma = t / (1 - t)
    else:
        scheduler.set_timesteps(4)
        sigma = scheduler.sigmas[1]
        scheduler._step_index = 1
    x = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(2)) * sigma
    step = scheduler.timesteps[0 if name == "sd3" else 1]
    with torch.no_grad():
        if name == "sd3":
            x_t = x / (1 + sigma)                                # x_t = (1 − t) x
            v = pipe.transformer(x_t, timestep=step.expand(2), encoder_hidden_states=cond["text"],
                                 pooled_projections=cond["pooled"]).sample
            expected = scheduler.step(v, step, x_t).prev_sample
        elif name == "sdxl":
            eps = pipe.unet(scheduler.scale_model_input(x, step), step, encoder_hidden_states=cond["text"],
                            added_cond_kwargs={"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}).sample
            expected = scheduler.step(eps, step, x).pred_original_sample
        else:
            out = pipe.transformer(scheduler.scale_model_input(x, step), encoder_hidden_states=cond["text"],
                                   encoder_attention_mask=cond["mask"], timestep=step.expand(2),
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            expected = scheduler.step(out.chunk(2, dim=1)[0], step, x).pred_original_sample
        ours = teacher.denoiser(x, sigma.expand(2), cond)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_prompts_are_encoded_as_the_pipeline_encodes_them_and_decode_through_its_vae(tiny_pipeline, name):
    """The condition and the null condition are the pipeline's encode_prompt outputs (SDXL's null: zeros, its
    force_zeros_for_empty_prompt; SDXL's time ids: the image size's); latents decode as the pipeline decodes them
    (SD3's VAE: scaling and shift; Sana's deep-compression VAE)."""
    folder = tiny_pipeline(name)
    teacher, pipe = teacher_of(folder), pipeline_of(name, folder)
    cond, null = teacher.encode(PROMPTS), teacher.null_condition(2)
    if name.startswith(("pixart", "sana")):
        kwargs = {"max_sequence_length": teacher.codec.max_sequence_length}
        if name == "sana":                                  # the instruction its __call__ passes by default
            kwargs["complex_human_instruction"] = teacher.codec.instruction.split("\n")
        text, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, device="cpu", **kwargs)
        expected = {"text": text, "mask": mask}, {"text": negative, "mask": negative_mask}
    else:
        kwargs = {"prompt_2": None, "prompt_3": None} if name.startswith("sd3") else {}
        text, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu", **kwargs)
        expected = {"text": text, "pooled": pooled}, {"text": negative, "pooled": negative_pooled}
    # float32 in both, and the pipeline encodes the empty prompt once per image where sid encodes it once for all:
    # the same computations, rounded as each call's kernels sum (another batch composition, another CPU)
    for ours, theirs in zip((cond, null), expected):
        for key, value in theirs.items():
            if value.is_floating_point():
                assert_float32_close(ours[key], value.float())
            else:
                torch.testing.assert_close(ours[key], value.to(ours[key].dtype))
    if name == "sdxl":
        assert not null["text"].any() and cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    latents = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(3))
    vae = pipe.vae
    with torch.no_grad():
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        expected_images = vae.decode(latents / vae.config.scaling_factor + shift).sample.clamp(-1, 1)
    assert_float32_close(teacher.decode(latents), expected_images)


def family_overrides(folder, prompts, run_dir, total, flow, *extra):
    """A few iterations with guidance inside the loss and its prompt dropout: SiD-DiT's settings on a flow teacher
    (logit-normal time, velocity fake loss, 1 − t weighting), SiD-LSG's otherwise."""
    native = (["loss.time=logit_normal", "loss.p_mean=0.693", "loss.p_std=1.6", "loss.weighting=one_minus_t",
               "generator.sigma_init=999"] if flow else
              ["loss.time=timesteps", "generator.t_init=625"])
    return ["teacher.kind=diffusers", f"teacher.diffusers.path={folder}", f"conditions.prompts={prompts}",
            "optim.batch=4", "optim.batch_gpu=2", f"train.total_nimg={total}", "train.log_every_nimg=4",
            "train.sample_every_nimg=8", "train.ckpt_every_nimg=4", "train.num_samples=2", f"train.run_dir={run_dir}",
            "train.progress=false", "train.tracker=none", "loss.guide_teacher=1.5", "loss.guide_fake=1.5",
            "loss.guide_fake_train=1.5", "loss.drop_cond=0.5", "loss.fake_loss=native", "loss.g_scale=1",
            "loss.lam=lambda1", *native, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl", "sd3", "pixart", "sana"])
def test_a_short_distillation_resumes_exactly_and_exports_a_pipeline_that_reloads(tiny_pipeline, tmp_path, name):
    """8 images straight equal 4, a stop, and 4 more (prompt position included); SiDPipeline.from_pretrained(export)
    (prompts) is the EMA generator's one step decoded by the teacher's VAE, and sid.load_generator reads the
    diffusers form alone."""
    from sid import SiDPipeline
    from sid.generator import OneStepGenerator, load_generator
    from sid.trainer import train

    folder = tiny_pipeline(name)
    (tmp_path / "p.txt").write_text("a cat\na red dog\na blue bird\n")
    flow = name in FLOW
    whole = train(load_config([], family_overrides(folder, tmp_path / "p.txt", tmp_path / "whole", 8, flow)))
    train(load_config([], family_overrides(folder, tmp_path / "p.txt", tmp_path / "split", 4, flow)))
    resumed = train(load_config([], family_overrides(folder, tmp_path / "p.txt", tmp_path / "split", 8, flow)),
                    resume="auto")
    assert whole.conditions.drawn == resumed.conditions.drawn == 2 * 8
    assert_resumed_exactly(whole, resumed)
    assert_trained(whole)

    export = tmp_path / "whole" / "generator"
    pipe = SiDPipeline.from_pretrained(export)
    assert pipe.text_to_image and pipe.config.teacher_pipeline == PIPELINES[name]
    z, _ = OneStepGenerator(whole.teacher.denoiser, whole.teacher.shape).inputs_for_seeds([0, 1])
    images = pipe(PROMPTS, latents=z, output_type="pt").images
    with torch.no_grad():
        expected = whole.teacher.decode(whole.ema.model(z, whole.teacher.encode(PROMPTS)))
    torch.testing.assert_close(images, expected / 2 + 0.5, rtol=1e-5, atol=1e-5)       # "pt": [0, 1]
    native = load_generator(export)                                                     # sid's files
    (export / "generator.safetensors").rename(tmp_path / "moved.safetensors")
    alone = load_generator(export)                                                      # the diffusers form alone
    cond = whole.teacher.encode(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(alone(z, cond), native(z, cond))
    assert alone.shape == whole.teacher.shape and np.isclose(alone.sigma_init, whole.generator.sigma_init)


def test_bad_latent_input_is_one_line(tiny_pipeline, tmp_path):
    """A folder lacking a component its family needs, a pipeline class no family reads (the line lists those
    read), a resolution the VAE and patches cannot make, a resolution for a pixel-space teacher, a T5 length for a
    family without T5 (or out of range)."""
    import json
    import shutil

    from sid.errors import SidError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline("sd3"), broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(SidError, match="is a StableDiffusion3Pipeline without text_encoder_2/; a "
                                       "StableDiffusion3Pipeline folder needs transformer, scheduler, vae, "
                                       "text_encoder, tokenizer, text_encoder_2, tokenizer_2 "):
        teacher_of(broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "HunyuanDiTPipeline"}))
    with pytest.raises(SidError, match="a HunyuanDiTPipeline with .* this version does not read "
                                       ".*StableDiffusion3Pipeline, PixArtAlphaPipeline"):
        teacher_of(broken)
    with pytest.raises(SidError, match="teacher.diffusers.resolution=18 must be a multiple of 4 for this pipeline"):
        build_with(tiny_pipeline("sd3"), "teacher.diffusers.resolution=18")
    with pytest.raises(SidError, match="teacher.diffusers.resolution is for latent pipelines"):
        build_with("builtin:fmnist", "teacher.diffusers.resolution=32")
    wider = build_with(tiny_pipeline("pixart"), "teacher.diffusers.resolution=32")
    assert wider.shape == (4, 16, 16)
    with pytest.raises(SidError, match="^teacher.diffusers.max_sequence_length=77: a StableDiffusionXLPipeline has no "
                                       "T5 or Gemma whose length can be set"):
        build_with(tiny_pipeline("sdxl"), "teacher.diffusers.max_sequence_length=77")
    with pytest.raises(SidError, match="max_sequence_length=0 is out of range"):
        build_with(tiny_pipeline("pixart"), "teacher.diffusers.max_sequence_length=0")
    longer = build_with(tiny_pipeline("pixart"), "teacher.diffusers.max_sequence_length=7")
    assert longer.encode(["a cat"])["text"].shape[1] == 7


def build_with(folder, *overrides):
    from sid.teachers import build_teacher

    return build_teacher(load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={folder}",
                                          *overrides]).teacher)


def test_the_sd3_preset_builds_sid_dits_recipe(tiny_pipeline, tmp_path):
    """configs/sd3_medium_dit.yaml with the tiny SD3 pipeline in its place: the generator at t = 1 exactly, logit-
    normal flow time (ln 2, 1.6) in both steps, the velocity fake loss, 1 − t weighting, κ = 4.5 in all four places
    with no prompt dropped, α = 1, lr 1e-6, micro-batches of 8, no EMA, activation checkpointing, the teacher at its
    512-px latents, T5 over 77 tokens."""
    import math

    from accelerate import Accelerator

    from sid.run import build

    (tmp_path / "p.txt").write_text("a cat\n")
    overrides = [f"teacher.diffusers.path={tiny_pipeline('sd3')}", f"conditions.prompts={tmp_path / 'p.txt'}",
                 "optim.batch=16", f"train.run_dir={tmp_path / 'run'}"]
    run = build(load_config(["sd3_medium_dit"], overrides), Accelerator(cpu=True), resume=None)
    loss = run.loss
    assert run.generator.sigma_init == math.inf and run.teacher.shape == (4, 256, 256)
    tokens = run.teacher.encode(["a cat"])["text"].shape[1]
    assert run.teacher.codec.max_sequence_length == 77 and tokens == 16 + 77      # the tiny CLIPs' 16, then T5's
    assert run.loss.drop_cond == 0
    assert (run.generator.steps, run.generator.renoise, run.cfg.generator.random_steps) == (4, "fresh", True)
    assert (loss.time, loss.p_mean, loss.p_std, loss.weighting) == ("logit_normal", math.log(2), 1.6, "one_minus_t")
    assert loss.fake_weight is not None and loss.lam == 1.0 and (loss.g_scale, loss.fake_scale) == (100 / 16, 1 / 16)
    assert loss.guide_fake_train == loss.guide_fake == loss.guide_teacher == 4.5
    assert (run.batch_gpu, run.opt_g.param_groups[0]["lr"], run.ema.halflife_nimg) == (8, 1e-6, 0)
    assert load_config(["sd3_medium_dit"]).teacher.diffusers.path == "stabilityai/stable-diffusion-3-medium-diffusers"


def test_a_flow_generator_starts_at_pure_noise_and_its_export_reloads(tiny_pipeline, tmp_path):
    """generator.sigma_init=inf on a flow teacher is SiD-DiT's generator at t = 1: G(z) = z − v(z; t = 1), the
    transformer fed z itself at timestep 1000; the export (σ_init ∞ and T5's length in its config) gives the same
    images. A teacher
    without that limit (ε on a discrete schedule) refuses it in one line."""
    from sid import SiDPipeline
    from sid.errors import SidError
    from sid.generator import OneStepGenerator, export_generator, load_generator

    teacher = build_with(tiny_pipeline("sd3"), "teacher.diffusers.max_sequence_length=7")
    generator = OneStepGenerator(teacher.denoiser, teacher.shape, float("inf"))
    z = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(5))
    cond = teacher.encode(PROMPTS)
    with torch.no_grad():
        ours = generator(z, cond)
        v = teacher.denoiser.net.transformer(hidden_states=z, timestep=torch.full((2,), 1000.0),
                                             encoder_hidden_states=cond["text"],
                                             pooled_projections=cond["pooled"]).sample
    torch.testing.assert_close(ours, z - v, rtol=0, atol=0)
    export_generator(generator, teacher.spec, tmp_path / "g", components=teacher.components())
    with torch.no_grad():
        torch.testing.assert_close(load_generator(tmp_path / "g")(z, cond), ours)
        pipe = SiDPipeline.from_pretrained(tmp_path / "g")
        images = pipe(PROMPTS, latents=z, output_type="latent").images
    torch.testing.assert_close(images, ours)
    assert pipe.codec().max_sequence_length == 7 and pipe.config.sigma_init == float("inf")
    sd = teacher_of(tiny_pipeline("sd"))
    with pytest.raises(SidError, match="^generator.sigma_init=inf .* has a limit only for flow teachers"):
        OneStepGenerator(sd.denoiser, sd.shape, float("inf"))


def test_sd3s_own_schedule_is_the_pipelines_default_call(tiny_pipeline):
    """sample_teacher on Teacher.sampling_sigmas (Euler, 6 steps, κ = 3 classifier-free) from each seed's noise equals
    StableDiffusion3Pipeline's plain call: its scheduler's shifted times from t = 1 (pure noise), to 1e-4 relative."""
    from sid.generator import OneStepGenerator
    from sid.sampling import sample_teacher

    folder = tiny_pipeline("sd3")
    teacher, pipe = teacher_of(folder), pipeline_of("sd3", folder)
    ours = sample_teacher(teacher.denoiser, teacher.shape, 6, "euler", [0, 1], cond=teacher.encode(PROMPTS),
                          guidance=3.0, guide=teacher.guide, sigmas=teacher.sampling_sigmas(6))
    z, _ = OneStepGenerator(teacher.denoiser, teacher.shape).inputs_for_seeds([0, 1])
    expected = pipe(PROMPTS, num_inference_steps=6, guidance_scale=3.0, latents=z, output_type="latent").images
    assert torch.isinf(teacher.sampling_sigmas(6)[0])
    assert (ours - expected).abs().max() / expected.abs().max() < 1e-4
    assert teacher_of(tiny_pipeline("sd")).sampling_sigmas(6) is None                # discrete: EDM's Karras schedule
