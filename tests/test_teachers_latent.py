"""Latent text-to-image teachers (sid/teachers/diffusers/latent.py) on a tiny Stable Diffusion pipeline built from
configs (UNet2DConditionModel, AutoencoderKL, a CLIP text encoder, a CLIP tokenizer written here): sid's denoiser is the
pipeline's own model, shown against the pipeline's own output."""

import numpy as np
import pytest
import torch
from tiny_pipelines import save_tiny_sd, teacher_of

from conftest import assert_float32_close
from sid.config import load_config
from sid.errors import SidError
from sid.guidance import guided
from sid.sampling import euler_sampler

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd_folder(tiny_pipeline):
    """A StableDiffusionPipeline of random tiny components, saved as a user's pipeline folder is."""
    return tiny_pipeline("sd")


PROMPTS = ["a cat", "a red dog"]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_euler_under_guidance_reproduces_the_pipelines_own_latents(sd_folder, guidance):
    """sid's Euler sampler on the adapter's denoiser, under CFG with the empty prompt as null, started from the
    pipeline's latents, gives the pipeline's own output (output_type="latent", its Euler scheduler, integer
    timesteps: "leading" spacing) to 1e-4 relative."""
    teacher = teacher_of(sd_folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours_latents = pipe(PROMPTS, num_inference_steps=6, guidance_scale=guidance, latents=z.clone(),
                        output_type="latent").images
    pipe.scheduler.set_timesteps(6)
    sigmas = pipe.scheduler.sigmas.double()
    denoiser = guided(teacher.denoiser, guidance, teacher.null_condition)
    start = z * pipe.scheduler.init_noise_sigma / sigmas[0]              # the pipeline scales its latents so
    ours = euler_sampler(denoiser, start, sigmas, teacher.encode(PROMPTS))
    scale = ours_latents.abs().max()
    print(f"max relative difference at κ = {guidance:g}: {float((ours - ours_latents).abs().max() / scale):.2e}")
    assert (ours - ours_latents).abs().max() / scale < 1e-4


def test_one_step_is_the_schedulers_own_prediction(sd_folder):
    """At one noise level sid's x0 equals the scheduler's pred_original_sample for the same model output."""
    teacher = teacher_of(sd_folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.scheduler.set_timesteps(4)
    t, sigma = pipe.scheduler.timesteps[1], pipe.scheduler.sigmas[1]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigma
    cond = teacher.encode(PROMPTS)
    with torch.no_grad():
        eps = pipe.unet(pipe.scheduler.scale_model_input(x, t), t, encoder_hidden_states=cond["text"]).sample
        pipe.scheduler._step_index = 1
        expected = pipe.scheduler.step(eps, t, x).pred_original_sample
        ours = teacher.denoiser(x, sigma.expand(2), cond)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_prompts_are_encoded_as_the_pipeline_encodes_them_and_decode_through_its_vae(sd_folder):
    teacher = teacher_of(sd_folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    # float32 in both, and the pipeline encodes the empty prompt once per image where sid encodes it once for all:
    # the same computations, rounded as each call's kernels sum (another batch composition, another CPU)
    assert_float32_close(teacher.encode(PROMPTS)["text"], embeds)
    assert_float32_close(teacher.null_condition(2)["text"], negative)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert_float32_close(teacher.decode(latents), expected)
    assert teacher.shape == (4, 8, 8) and teacher.spec["pipeline"] == "StableDiffusionPipeline"


def test_sid_sample_draws_the_teacher_for_prompts(sd_folder, tmp_path):
    """`sid sample --teacher FOLDER --prompt ... --guidance κ`: decoded images, one per seed, prompts cycled."""
    from sid.cli import main as sid

    common = ["sample", "--teacher", str(sd_folder), "--prompt", "a cat", "--prompt", "a dog", "--guidance", "2",
              "--steps", "4", "--solver", "euler"]
    assert sid([*common, "--seeds", "0-3", "--out", str(tmp_path / "t.npz")]) == 0
    images = np.load(tmp_path / "t.npz")["images"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert sid([*common, "--seeds", "2-3", "--out", str(tmp_path / "u.npz")]) == 0
    # a seed's image is its seed's and prompt's: within one level of 255, since a batch of 2 sums in another order
    # than a batch of 4 and float32 rounding may carry a pixel across a level (a wrong seed moves most of them)
    assert np.abs(np.load(tmp_path / "u.npz")["images"].astype(np.int16) - images[2:]).max() <= 1


@pytest.mark.slow
def test_bad_text_to_image_input_is_one_line(sd_folder, tmp_path, capsys):
    import shutil

    from sid.cli import main as sid

    (tmp_path / "empty.txt").write_text("\n  \n")
    for flag, value, message in (("--prompts-file", tmp_path / "empty.txt", "holds no prompts; give one"),
                                 ("--prompts-file", tmp_path / "nope.txt", "cannot read the prompts file"),
                                 ("--guidance", "2", "give --prompt or --prompts-file")):
        assert sid(["sample", "--teacher", str(sd_folder), flag, str(value), "--out", str(tmp_path / "z.npz")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(SidError, match="is a StableDiffusionPipeline without vae/; a StableDiffusionPipeline folder "
                                       "needs unet, scheduler, vae, text_encoder, tokenizer"):
        teacher_of(broken)
    assert sid(["sample", "--teacher", "builtin:fmnist", "--prompt", "a cat", "--out", str(tmp_path / "y.npz")]) == 2
    assert "--prompt given, but this teacher takes no text" in capsys.readouterr().err
    assert sid(["train", "teacher.kind=diffusers", f"teacher.diffusers.path={sd_folder}",
                f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("a text-to-image teacher is distilled from prompts: set conditions.prompts=FILE (one prompt "
                        "per line, or .jsonl)\n") and err.count("\n") == 1, err
    assert not list((tmp_path / "run").glob("training-state-*"))


def text_overrides(sd_folder, prompts, run_dir, total, *extra):
    """A few iterations on the tiny pipeline with SiD-LSG's settings: guidance inside the loss and its prompt
    dropout, the teacher's own timesteps 20..979, the generator at t_init 625, the ε-MSE fake loss, lsg = 1."""
    return ["teacher.kind=diffusers", f"teacher.diffusers.path={sd_folder}", f"conditions.prompts={prompts}",
            "optim.batch=4", "optim.batch_gpu=2", f"train.total_nimg={total}", "train.log_every_nimg=8",
            "train.sample_every_nimg=16", "train.ckpt_every_nimg=8", "train.num_samples=4", f"train.run_dir={run_dir}",
            "train.progress=false", "train.tracker=none", "loss.guide_teacher=1.5", "loss.guide_fake=1.5",
            "loss.guide_fake_train=1.5", "loss.drop_cond=0.5", "loss.time=timesteps", "loss.fake_loss=native",
            "generator.t_init=625", "loss.g_scale=1", "loss.lam=lambda1", *extra]


@pytest.fixture(scope="module")
def text_runs(sd_folder, tmp_path_factory):
    """One run of 16 images straight, one stopped at 8 and resumed to 16."""
    from sid.trainer import train

    root = tmp_path_factory.mktemp("text-runs")
    (root / "prompts.txt").write_text("a cat\na red dog\na blue bird\na green frog\nan old car\n")
    whole = train(load_config([], text_overrides(sd_folder, root / "prompts.txt", root / "whole", 16)))
    train(load_config([], text_overrides(sd_folder, root / "prompts.txt", root / "split", 8)))
    resumed = train(load_config([], text_overrides(sd_folder, root / "prompts.txt", root / "split", 16)),
                    resume="auto")
    return root, whole, resumed


@pytest.mark.slow
def test_a_text_to_image_teacher_distils_from_prompts_and_resumes_exactly(text_runs):
    """The prompt stream's position travels in the training state: the resumed run draws the prompts the
    uninterrupted one drew and ends bit-identical to it."""
    root, whole, resumed = text_runs
    assert whole.conditions.drawn == resumed.conditions.drawn == 4 * 8       # 4 iterations × (fake + generator)
    assert abs(whole.generator.sigma_init - 2.5017) < 1e-4 and whole.loss.time == "timesteps"
    for name in ("generator", "fake_score"):
        a, b = getattr(whole, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = whole.ema.model.state_dict(), resumed.ema.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = dict(whole.teacher.denoiser.state_dict())
    assert any(not torch.equal(start[k], v) for k, v in whole.generator.denoiser.state_dict().items())   # it trained
    samples = root / "whole" / "samples"
    assert (samples / "compare.png").is_file() and (samples / "prompts.txt").read_text().splitlines() == \
        ["a cat", "a red dog", "a blue bird", "a green frog"]


@pytest.mark.slow
def test_the_export_is_a_text_to_image_pipeline_that_diffusers_loads(text_runs, tmp_path):
    """SiDPipeline.from_pretrained(export)(prompts) is the trained EMA generator's one step, decoded by the
    teacher's VAE; `sid sample` on the run folder draws the same images for its seeds."""
    from sid import SiDPipeline
    from sid.cli import main as sid
    from sid.generator import OneStepGenerator

    root, whole, _ = text_runs
    pipe = SiDPipeline.from_pretrained(root / "whole" / "generator")
    assert pipe.text_to_image and type(pipe.text_encoder).__name__ == "CLIPTextModel"
    z, _ = OneStepGenerator(whole.teacher.denoiser, (4, 8, 8)).inputs_for_seeds([0, 1])
    images = pipe(PROMPTS, latents=z, output_type="pt").images
    with torch.no_grad():
        expected = whole.teacher.decode(whole.ema.model(z, whole.teacher.encode(PROMPTS)))
    torch.testing.assert_close(images, expected / 2 + 0.5, rtol=1e-5, atol=1e-5)       # "pt": [0, 1]
    other = pipe(["a blue bird", "an old car"], latents=z, output_type="pt").images
    assert (other - images).abs().max() > 1e-4                                  # the prompt matters
    assert len(pipe("a cat", batch_size=3).images) == 3

    assert sid(["sample", str(root / "whole"), "--prompt", "a cat", "--prompt", "a red dog", "--seeds", "0-1",
                "--out", str(tmp_path / "s.npz")]) == 0
    drawn = np.load(tmp_path / "s.npz")["images"]
    assert (drawn == pipe(PROMPTS, latents=z, output_type="np").images.__mul__(255).round().astype(np.uint8)).mean() \
        > 0.99                                                                 # the same images, up to rounding
    assert sid(["sample", str(root / "whole"), "--out", str(tmp_path / "t.npz")]) == 2


@pytest.mark.slow
def test_an_embeddings_cache_trains_the_same_and_refuses_another_encoder(sd_folder, text_runs, tmp_path):
    """conditions.cache: encoded once, read on the next run, and the same numbers as encoding on the fly (here with
    the VAE and text encoder offloaded between uses); a cache made by another text encoder is one line, with the
    run folder left as it was."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sid.trainer import train

    root, whole, _ = text_runs
    prompts, cache = root / "prompts.txt", tmp_path / "emb.safetensors"
    cached = train(load_config([], text_overrides(sd_folder, prompts, tmp_path / "c", 16, f"conditions.cache={cache}",
                                                  "perf.offload_codec=true")))
    assert cached.teacher.codec.visit is not None
    assert cache.is_file()
    a, b = whole.generator.state_dict(), cached.generator.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    other = tmp_path / "other"
    shutil.copytree(sd_folder, other)
    weights = next((other / "text_encoder").glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    with pytest.raises(SidError, match="was made with another text encoder than this teacher's"):
        train(load_config([], text_overrides(other, prompts, tmp_path / "d", 16, f"conditions.cache={cache}")))
    assert not (tmp_path / "d" / "generator").exists()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_native_fake_loss_is_the_pipelines_own_training_loss(tmp_path, prediction_type):
    """loss.fake_loss=native at the teacher's own timesteps is the loss diffusers' training scripts compute:
    ε-MSE, or v-MSE × snr/(snr + 1) (SiD-LSG), on add_noise(x0, ε, k) at integer k (σ_k drawn in float32 is fed as
    k: ``DiscreteVPRule.sigma_to_t``)."""
    from diffusers.training_utils import compute_snr

    folder = save_tiny_sd(tmp_path, prediction_type)
    teacher = teacher_of(folder)
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    k = torch.tensor([20, 625, 979])
    cond = teacher.encode(["a cat", "a dog", ""])
    with torch.no_grad():
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
        pred = unet(scheduler.add_noise(x0, noise, k), k, encoder_hidden_states=cond["text"]).sample
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, k)
        expected = ((pred - target) ** 2).flatten(1).sum(1)
        if prediction_type == "v_prediction":
            snr = compute_snr(scheduler, k)
            expected = expected * snr / (snr + 1)
        sigma = teacher.timestep_sigmas()[k].float()                       # as training draws it
        ours = teacher.training_weight(sigma) * ((teacher.denoiser(x0 + sigma[:, None, None, None] * noise, sigma,
                                                                   cond) - x0) ** 2).flatten(1).sum(1)
    # the UNet on the same integer k and x_t reached two ways (sqrt(ā) x0 + sqrt(1 − ā) ε and (x0 + σ ε) / sqrt(1 + σ²))
    assert_float32_close(ours, expected)
    assert abs(float(teacher.timestep_sigmas()[625]) - 2.5017) < 1e-4          # SiD-LSG's t_init: σ_init 2.5


def test_a_hub_id_of_a_pipeline_loads_from_the_cache(sd_folder, tmp_path, monkeypatch):
    """teacher.diffusers.path=owner/name of a StableDiffusionPipeline: its components from the Hugging Face
    cache (offline here), the same teacher as the folder."""
    import shutil

    import huggingface_hub

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--owner--sd"
    shutil.copytree(sd_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub, local = teacher_of("owner/sd"), teacher_of(sd_folder)
    assert hub.text_to_image and hub.spec["pipeline"] == "StableDiffusionPipeline"
    torch.testing.assert_close(hub.encode(PROMPTS)["text"], local.encode(PROMPTS)["text"])
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 5.0])
    with torch.no_grad():
        torch.testing.assert_close(hub.denoiser(x, sigma, hub.encode(PROMPTS)),
                                   local.denoiser(x, sigma, local.encode(PROMPTS)))


@pytest.mark.parametrize("preset", ["sd15_lsg", "sd21_lsg"])
def test_the_sid_lsg_presets_build_their_recipe(sd_folder, tmp_path, preset):
    """The SiD-LSG presets, their teacher swapped for the tiny pipeline (same scaled-linear schedule): the
    generator at σ_625 = 2.5017, both steps on timesteps 20..979, ε-MSE fake loss, α = 1, κ = 1.5, lsg = 1,
    lr 1e-6, micro-batches of 1 accumulated to the batch."""
    from accelerate import Accelerator

    from sid.run import build

    (tmp_path / "p.txt").write_text("a cat\n")
    cfg = load_config([preset], [f"teacher.diffusers.path={sd_folder}", f"conditions.prompts={tmp_path / 'p.txt'}",
                                 "optim.batch=4", f"train.run_dir={tmp_path / 'run'}"])
    run = build(cfg, Accelerator(cpu=True), resume=None)
    loss = run.loss
    assert abs(run.generator.sigma_init - 2.5017) < 1e-4 and (loss.time, loss.timesteps) == ("timesteps", (20, 979))
    assert loss.fake_weight is not None and loss.lam == 1.0 and loss.g_scale == loss.fake_scale == 1 / 4
    assert loss.guide_fake_train == loss.guide_fake == loss.guide_teacher == 1.5 and loss.drop_cond == 0.1
    assert (run.batch_gpu, run.rounds, run.opt_g.param_groups[0]["lr"]) == (1, 4, 1e-6)
    assert load_config([preset]).teacher.diffusers.path.count("/") == 1 and cfg.optim.batch_gpu == 1


@pytest.mark.slow
def test_text_to_image_fid_and_clip_score_offline_and_in_the_loop(sd_folder, text_runs, tmp_path):
    """`sid fid gen` on a text-to-image export: FID for the prompts of a file at the named resolution and the CLIP
    score (the mean cosine of CLIP's image and prompt embeddings of the same images, as computed here by hand),
    the model and resize named; in the loop the same."""
    import json

    from tiny_pipelines import save_feature_extractor, save_tiny_clip

    from sid.cli import main as sid
    from sid.generator import load_generator
    from sid.metrics import resize, text_sampler, to_uint8_nchw
    from sid.teachers.diffusers import export_codec
    from sid.trainer import train

    root, _, _ = text_runs
    clip = save_tiny_clip(tmp_path)
    extractor = save_feature_extractor(tmp_path / "features.pt")          # a fast stand-in for Inception
    np.savez(tmp_path / "real.npz", images=np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), np.uint8))
    assert sid(["fid", "ref", "--source", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref.npz"),
                "--weights", str(extractor)]) == 0
    common = ["--ref", str(tmp_path / "ref.npz"), "--num", "6", "--resolution", "32", "--weights", str(extractor),
              "--json", str(tmp_path / "r.jsonl")]
    assert sid(["fid", "gen", str(root / "whole"), "--prompts-file", str(root / "prompts.txt"), "--clip", str(clip),
                *common]) == 0
    result = json.loads((tmp_path / "r.jsonl").read_text())
    assert "32×32 (bicubic, antialiased)" in result["what"] and f"CLIP score by {clip}" in result["what"]
    assert np.isfinite(result["mean"]) and -1 <= result["clip"][0] <= 1

    generator, codec = load_generator(root / "whole"), export_codec(root / "whole")
    prompts = (root / "prompts.txt").read_text().split("\n")[:5]
    sample = text_sampler(generator, codec)
    def clip_score():                                    # the projected embeddings, cosine by hand
        model = transformers.CLIPModel.from_pretrained(clip).eval()
        processor = transformers.CLIPProcessor.from_pretrained(clip)

        class Score:
            def update(self, images, texts):
                with torch.no_grad():
                    a = model.get_image_features(processor(images=list(images), return_tensors="pt")["pixel_values"])
                    b = model.get_text_features(**processor(text=texts, return_tensors="pt", padding=True))
                a, b = [getattr(v, "pooler_output", v) for v in (a, b)]
                self.value = 100 * torch.nn.functional.cosine_similarity(a, b).mean()

            def compute(self):
                return self.value

        return Score()

    by_hand = clip_score()
    texts = [prompts[i % 5] for i in range(6)]
    by_hand.update(to_uint8_nchw(resize(sample(list(range(6)), texts), 32)), texts)
    assert abs(result["clip"][0] - float(by_hand.compute()) / 100) < 1e-5
    assert sid(["fid", "gen", str(root / "whole"), *common]) == 2                  # no prompts: one line

    evaluated = text_overrides(sd_folder, root / "prompts.txt", tmp_path / "eval", 8, "eval.every_nimg=8",
                               "eval.num=4", f"eval.fid_ref={tmp_path / 'ref.npz'}", f"eval.clip={clip}",
                               f"eval.fid_weights={extractor}",
                               "eval.resolution=32")
    train(load_config([], evaluated))
    records = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "fid" in r]
    assert measured and np.isfinite(measured[-1]["fid"]) and -1 <= measured[-1]["clip"] <= 1
    assert (tmp_path / "eval" / "generator-best" / "model_index.json").is_file()


def test_an_offloaded_codec_visits_its_device_only_to_work(sd_folder):
    """perf.offload_codec: the VAE and text encoder are moved to the working device for each encode or decode and
    back to the CPU after, with the same results (on this CPU-only machine the visit is recorded, not seen)."""
    teacher, reference = teacher_of(sd_folder), teacher_of(sd_folder)
    moves = []
    for net in (teacher.codec.vae, teacher.codec.parts["text_encoder"]):
        def move(*args, _to=net.to, _name=type(net).__name__, **kwargs):
            moves.append((_name, str(args[0] if args else kwargs.get("device"))))
            return _to(*args, **kwargs)
        net.to = move
    teacher.offload_codec("cpu")
    moves.clear()
    latents = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(teacher.encode(PROMPTS)["text"], reference.encode(PROMPTS)["text"])
    assert moves == [("AutoencoderKL", "cpu"), ("CLIPTextModel", "cpu")] * 2              # there, and back
    torch.testing.assert_close(teacher.decode(latents), reference.decode(latents))
    assert len(moves) == 8


def test_the_unet_is_fed_its_own_integer_timesteps(sd_folder):
    """In float32 training at the teacher's timesteps (SiD-LSG) and in the generator at t_init 625, the UNet
    receives the integer k, as SiD-LSG feeds it, not k ± 3e-5 (its σ_k rounded to float32 and mapped back)."""
    from sid.generator import OneStepGenerator
    from sid.losses import DistillationLoss

    teacher = teacher_of(sd_folder)
    fed = []
    teacher.denoiser.net.unet.register_forward_pre_hook(lambda m, args, kw: fed.append(kw.get("timestep", args[1])),
                                                       with_kwargs=True)
    cfg = load_config([], ["loss.time=timesteps", "loss.fake_loss=native"])
    loss = DistillationLoss.from_config(cfg.loss, teacher, per_process=8)
    cond = teacher.encode(PROMPTS * 4)
    torch.manual_seed(0)
    with torch.no_grad():
        x_g = OneStepGenerator(teacher.denoiser, teacher.shape, float(teacher.timestep_sigmas()[625]))(
            torch.randn(8, *teacher.shape), cond)
        loss.generator(teacher.denoiser, teacher.denoiser, x_g, cond)
        loss.fake_score(teacher.denoiser, x_g, cond)
    fed = torch.cat([torch.as_tensor(t).reshape(-1) for t in fed]).double()
    assert fed[:8].eq(625).all() and len(fed) == 8 * 4
    assert torch.equal(fed, fed.round()) and 20 <= fed[8:].min() and fed[8:].max() <= 979
