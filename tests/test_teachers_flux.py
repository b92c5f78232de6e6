"""FLUX.1 as a latent family (sid/teachers/diffusers/families/flux.py) on tiny FluxPipelines built from configs: a
guidance-distilled one (FLUX.1-dev: a guidance embedding, the resolution-dependent shift) and one without (FLUX.1-
schnell). sid's denoiser on ordinary [B, C, H, W] latents is the pipeline's packed transformer, shown against the
pipeline's own output; a short guided distillation resumes exactly and its export reloads."""

import pytest
import torch

from conftest import assert_float32_close, assert_resumed_exactly, assert_trained
from sid.config import load_config
from sid.sampling import euler_sampler

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a cat", "a red dog"]
SIGMAS = [0.97, 0.8, 0.6, 0.4, 0.2, 0.05]                 # flow times the pipeline shifts (dev) or keeps (schnell)
RESOLUTION = 16                                           # images 16×16: latents 4×8×8, 16 tokens


def flux_teacher(folder, *overrides):
    from sid.teachers import build_teacher

    return build_teacher(load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={folder}",
                                          f"teacher.diffusers.resolution={RESOLUTION}", *overrides]).teacher)


@pytest.fixture(scope="module", params=["flux", "flux-schnell"])
def flux(request, tiny_pipeline):
    """(name, folder, sid's teacher, the FluxPipeline) of each tiny pipeline."""
    folder = tiny_pipeline(request.param)
    return request.param, folder, flux_teacher(folder), diffusers.FluxPipeline.from_pretrained(folder)


def test_latents_pack_as_the_pipeline_packs_them():
    from sid.teachers.diffusers.families.flux import image_ids, pack, unpack

    x = torch.randn(2, 4, 8, 6)
    packed = diffusers.FluxPipeline._pack_latents(x, 2, 4, 8, 6)
    assert torch.equal(pack(x), packed) and torch.equal(unpack(packed, 8, 6), x)
    assert torch.equal(image_ids(8, 6), diffusers.FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_euler_under_guidance_reproduces_the_pipelines_own_latents(flux):
    """sid's Euler sampler on the adapter's denoiser, guided as the teacher is (FLUX.1-dev: κ = 3 fed to its guidance
    embedding, one forward; schnell: classifier-free against the empty prompt, the pipeline's true CFG), from the
    pipeline's latents, gives its own output (output_type="latent", unpacked; the flow-Euler scheduler through the
    resolution-shifted times it sets) to 1e-4 relative."""
    name, _, teacher, pipe = flux
    z = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(1))
    guide = {"guidance_scale": 3.0} if name == "flux" else {"true_cfg_scale": 3.0, "negative_prompt": [""] * 2}
    packed = pipe(PROMPTS, height=RESOLUTION, width=RESOLUTION, num_inference_steps=6, sigmas=SIGMAS,
                  latents=diffusers.FluxPipeline._pack_latents(z, 2, *teacher.shape), output_type="latent",
                  **guide).images
    expected = diffusers.FluxPipeline._unpack_latents(packed, RESOLUTION, RESOLUTION, 2)
    t = pipe.scheduler.sigmas.double()                           # flow times, ending at 0
    if name == "flux":
        assert not torch.allclose(t[:-1].float(), torch.tensor(SIGMAS))           # the dev scheduler shifted them
    ours = euler_sampler(teacher.guide(teacher.denoiser, 3.0), z / t[0], t / (1 - t), teacher.encode(PROMPTS))
    scale = expected.abs().max()
    print(f"{name}: max relative difference {float((ours - expected).abs().max() / scale):.2e}")
    assert (ours - expected).abs().max() / scale < 1e-4
    assert teacher.guidance_embedded == (name == "flux") and teacher.shape == (4, 8, 8)


def test_one_step_is_the_flow_euler_step_and_guidance_is_the_embeddings_input(flux):
    """At one noise level sid's x0 is the scheduler's step from t to 0 on the transformer's packed output; a
    FLUX.1-dev condition without "guidance" gets 1 (the official SiD-DiT generator's), and teacher.guide feeds κ."""
    name, _, teacher, pipe = flux
    cond = teacher.encode(PROMPTS)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(sigmas=[0.6], mu=0.8)
    t = scheduler.sigmas[0]
    x_t = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(2))
    for kappa in (None, 2.5) if name == "flux" else (None,):          # schnell's κ is classifier-free
        guidance = torch.full((2,), 1.0 if kappa is None else kappa) if name == "flux" else None
        with torch.no_grad():
            v = pipe.transformer(hidden_states=diffusers.FluxPipeline._pack_latents(x_t, 2, 4, 8, 8),
                                 timestep=scheduler.timesteps[:1].expand(2) / 1000, guidance=guidance,
                                 pooled_projections=cond["pooled"], encoder_hidden_states=cond["text"],
                                 txt_ids=torch.zeros(cond["text"].shape[1], 3),
                                 img_ids=diffusers.FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu",
                                                                                          torch.float32)).sample
            step = scheduler.step(v, scheduler.timesteps[0], diffusers.FluxPipeline._pack_latents(x_t, 2, 4, 8, 8))
            scheduler._step_index = None
            expected = diffusers.FluxPipeline._unpack_latents(step.prev_sample, RESOLUTION, RESOLUTION, 2)
            sigma = (t / (1 - t)).expand(2)
            net = teacher.denoiser if kappa is None else teacher.guide(teacher.denoiser, kappa)
            ours = net(x_t * (1 + sigma[0]), sigma, cond)                   # x = x_t / (1 − t)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_prompts_are_encoded_as_the_pipeline_encodes_them_and_decode_through_its_vae(flux):
    """The condition (T5's states over 512 tokens, CLIP's pooled output) and the null condition are
    FluxPipeline.encode_prompt's; latents decode as the pipeline decodes them (scaling and shift factors)."""
    _, folder, teacher, pipe = flux
    for prompts, ours in ((PROMPTS, teacher.encode(PROMPTS)), ([""] * 2, teacher.null_condition(2))):
        text, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, device="cpu")
        # float32 in both; the empty prompt encoded once for all here, once per image there (another batch)
        assert_float32_close(ours["text"], text)
        assert_float32_close(ours["pooled"], pooled)
        assert ours["text"].shape[1] == 512 and not text_ids.any()
    shorter = flux_teacher(folder, "teacher.diffusers.max_sequence_length=32")
    text, _, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu", max_sequence_length=32)
    assert_float32_close(shorter.encode(PROMPTS)["text"], text)
    latents = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(3))
    vae = pipe.vae
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    assert_float32_close(teacher.decode(latents), expected)


def flux_overrides(folder, prompts, run_dir, total):
    """A few iterations with SiD-DiT's flow settings, the teacher guided at 3.5 through its embedding, the generator
    at t = 1, T5 over 16 tokens (fast)."""
    return ["teacher.kind=diffusers", f"teacher.diffusers.path={folder}", f"teacher.diffusers.resolution={RESOLUTION}",
            "teacher.diffusers.max_sequence_length=16", f"conditions.prompts={prompts}", "optim.batch=4",
            "optim.batch_gpu=2", f"train.total_nimg={total}", "train.log_every_nimg=4", "train.sample_every_nimg=8",
            "train.ckpt_every_nimg=4", "train.num_samples=2", f"train.run_dir={run_dir}", "train.progress=false",
            "train.tracker=none", "loss.guide_teacher=3.5", "loss.fake_loss=native", "loss.lam=lambda1",
            "loss.time=logit_normal", "loss.p_mean=0.693", "loss.p_std=1.6", "loss.weighting=one_minus_t",
            "generator.sigma_init=inf"]


@pytest.mark.slow
def test_a_guided_distillation_resumes_exactly_and_exports_a_pipeline_that_reloads(tiny_pipeline, tmp_path):
    """FLUX.1-dev: 8 images straight equal 4, a stop, and 4 more; SiDPipeline.from_pretrained(export)(prompts) is
    the EMA generator's one step decoded by the teacher's VAE, with T5's length as trained; sid.load_generator reads
    it alike."""
    from sid import SiDPipeline
    from sid.generator import load_generator
    from sid.trainer import train

    folder = tiny_pipeline("flux")
    (tmp_path / "p.txt").write_text("a cat\na red dog\na blue bird\n")
    whole = train(load_config([], flux_overrides(folder, tmp_path / "p.txt", tmp_path / "whole", 8)))
    train(load_config([], flux_overrides(folder, tmp_path / "p.txt", tmp_path / "split", 4)))
    resumed = train(load_config([], flux_overrides(folder, tmp_path / "p.txt", tmp_path / "split", 8)), resume="auto")
    assert_resumed_exactly(whole, resumed)
    assert_trained(whole)

    export = tmp_path / "whole" / "generator"
    pipe = SiDPipeline.from_pretrained(export)
    assert pipe.config.teacher_pipeline == "FluxPipeline" and pipe.codec().max_sequence_length == 16
    z = torch.randn(2, *whole.teacher.shape, generator=torch.Generator().manual_seed(0))
    images = pipe(PROMPTS, latents=z, output_type="pt").images
    cond = whole.teacher.encode(PROMPTS)
    with torch.no_grad():
        expected = whole.teacher.decode(whole.ema.model(z, cond))
        torch.testing.assert_close(load_generator(export)(z, cond), whole.ema.model(z, cond))
    torch.testing.assert_close(images, expected / 2 + 0.5, rtol=1e-5, atol=1e-5)       # "pt": [0, 1]
    assert pipe.sample_shape() == (4, 8, 8)


def test_the_flux_preset_builds_sid_dits_recipe(tiny_pipeline, tmp_path):
    """configs/flux_dev_sid_dit.yaml with the tiny FLUX.1-dev pipeline in its place: the generator at t = 1,
    logit-normal flow time (ln 2, 1.6), the velocity fake loss on prompts never dropped, 1 − t weighting, κ = 4.5
    (the teacher's through its guidance embedding), α = 1, lr 1e-6, no EMA, T5 over 512 tokens, 512-px images."""
    import math

    from accelerate import Accelerator

    from sid.run import build

    (tmp_path / "p.txt").write_text("a cat\n")
    overrides = [f"teacher.diffusers.path={tiny_pipeline('flux')}", f"conditions.prompts={tmp_path / 'p.txt'}",
                 "optim.batch=16", f"train.run_dir={tmp_path / 'run'}"]
    run = build(load_config(["flux_dev_sid_dit"], overrides), Accelerator(cpu=True), resume=None)
    loss = run.loss
    assert run.generator.sigma_init == math.inf and run.teacher.shape == (4, 256, 256)       # the tiny VAE's factor 2
    assert (loss.time, loss.p_mean, loss.p_std, loss.weighting) == ("logit_normal", math.log(2), 1.6, "one_minus_t")
    assert loss.fake_weight is not None and loss.lam == 1.0 and loss.drop_cond == 0
    assert loss.guide_fake_train == loss.guide_fake == loss.guide_teacher == 4.5 and run.teacher.guidance_embedded
    assert run.teacher.codec.max_sequence_length == 512 and run.opt_g.param_groups[0]["lr"] == 1e-6
    assert (run.generator.steps, run.generator.renoise, run.cfg.generator.random_steps) == (4, "fresh", True)
    assert load_config(["flux_dev_sid_dit"]).teacher.diffusers.path == "black-forest-labs/FLUX.1-dev"


def test_lora_students_train_on_flux(tiny_pipeline, tmp_path):
    """LoRA students on the FLUX transformer (the default targets: its attention projections) train and export."""
    from sid.generator import load_generator
    from sid.trainer import train

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    run = train(load_config([], flux_overrides(tiny_pipeline("flux"), tmp_path / "p.txt", tmp_path / "run", 4)
                            + ["lora.fake_score=true", "lora.generator=true", "lora.rank=4"]))
    trained = [p for p in run.generator.parameters() if p.requires_grad]
    assert trained and sum(p.numel() for p in trained) < sum(p.numel() for p in run.teacher.denoiser.parameters())
    z = torch.randn(1, *run.teacher.shape)
    cond = run.teacher.encode(["a cat"])
    with torch.no_grad():                       # the export's merged weights: the same values, rounded once more
        assert_float32_close(load_generator(tmp_path / "run" / "generator")(z, cond), run.ema.model(z, cond))


def test_the_teachers_own_schedule_is_the_pipelines_default_call(flux):
    """`sid sample --teacher` (sample_teacher on Teacher.sampling_sigmas, Euler) from each seed's noise equals the
    pipeline's plain call with 6 steps (FLUX.1-dev: sigmas linspace(1, 1/6) shifted by the resolution's μ, from t = 1,
    pure noise; κ = 3 through the embedding; schnell: its unshifted schedule, κ = 1), to 1e-4 relative."""
    from sid.generator import OneStepGenerator
    from sid.sampling import sample_teacher

    name, _, teacher, pipe = flux
    kappa = 3.0 if name == "flux" else 1.0
    sigmas = teacher.sampling_sigmas(6)
    assert torch.isinf(sigmas[0]) and sigmas[-1] == 0 and len(sigmas) == 7
    ours = sample_teacher(teacher.denoiser, teacher.shape, 6, "euler", [0, 1], cond=teacher.encode(PROMPTS),
                          guidance=kappa, guide=teacher.guide, sigmas=sigmas)
    z, _ = OneStepGenerator(teacher.denoiser, teacher.shape).inputs_for_seeds([0, 1])
    packed = pipe(PROMPTS, height=RESOLUTION, width=RESOLUTION, num_inference_steps=6, guidance_scale=kappa,
                  latents=diffusers.FluxPipeline._pack_latents(z, 2, *teacher.shape), output_type="latent").images
    expected = diffusers.FluxPipeline._unpack_latents(packed, RESOLUTION, RESOLUTION, 2)
    assert (ours - expected).abs().max() / expected.abs().max() < 1e-4
