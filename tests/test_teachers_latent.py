"""Latent text-to-image teachers (sid/teachers/latent.py) on a tiny Stable Diffusion pipeline built from configs
(UNet2DConditionModel, AutoencoderKL, a CLIP text encoder, a CLIP tokenizer written here): sid's denoiser is the
pipeline's own model, shown against the pipeline's own output."""

import json

import numpy as np
import pytest
import torch

from conftest import sid_process
from sid.config import load_config
from sid.errors import SidError
from sid.guidance import guided
from sid.sampling import euler_sampler
from sid.teachers import build_teacher

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


def tiny_tokenizer(folder):
    """A CLIP tokenizer with a vocabulary of single letters (unknown pieces map to the end-of-text token)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A StableDiffusionPipeline of random tiny components, saved as a user's pipeline folder is."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                             tokenizer=tiny_tokenizer(root / "vocab"), scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def teacher_of(folder):
    return build_teacher(load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={folder}"]).teacher)


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
    torch.testing.assert_close(teacher.encode(PROMPTS)["text"], embeds)
    torch.testing.assert_close(teacher.null_condition(2)["text"], negative)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(teacher.decode(latents), expected)
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
    assert (np.load(tmp_path / "u.npz")["images"] == images[2:]).all()      # a seed's image: its seed and prompt


@pytest.mark.slow
def test_bad_text_to_image_input_is_one_line(sd_folder, tmp_path, capsys):
    import shutil

    from sid.cli import main as sid

    (tmp_path / "empty.txt").write_text("\n  \n")
    for flag, value, message in (("--prompts-file", tmp_path / "empty.txt", "holds no prompts: one prompt per line"),
                                 ("--prompts-file", tmp_path / "nope.txt", "nope.txt cannot be read"),
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
    out = sid_process("train", "teacher.kind=diffusers", f"teacher.diffusers.path={sd_folder}",
                      f"train.run_dir={tmp_path / 'run'}")                 # the command as a user runs it
    assert out.returncode == 2 and out.stderr.endswith("text-to-image teacher, which sid samples (sid sample "
                                                       "--teacher FOLDER --prompt ...) but does not distil yet\n")
    assert not list((tmp_path / "run").glob("training-state-*")) and out.stderr.count("\n") == 1
