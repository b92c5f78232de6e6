"""SiDPipeline keeps diffusers' pipeline contract (sid/teachers/diffusers/pipeline.py), tested property by property as
diffusers tests its own pipelines (its PipelineTesterMixin, latent and from_pipe mixins), on a tiny Stable Diffusion
generator of two steps, a tiny PixArt one (attention masks) and tiny pixel ones, all built from configs.

Tolerances: "the same computation" in another arrangement (a batch against single images, embeddings passed back,
a saved and loaded copy, offloaded networks) is float32 work of O(1) values through a few layers: 1e-5, where a
wrong prompt, noise or step moves images by 1e-2 or more.
"""

import contextlib
import copy
import inspect
import io
import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DModel
from tiny_pipelines import save_tiny_pixart, save_tiny_sd

from sid.teachers.diffusers import SiDPipeline

pytestmark = pytest.mark.slow
TEXT_TO_IMAGE = {"prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds",
                 "negative_prompt_embeds", "cross_attention_kwargs"}
OPTIONAL = {"num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type", "return_dict",
            "callback_on_step_end", "callback_on_step_end_tensor_inputs"}


def seeded(*seeds):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return generators[0] if len(generators) == 1 else generators


@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    """The components of a tiny SD generator (the teacher's own, as an export holds them) and its settings."""
    sd = diffusers.StableDiffusionPipeline.from_pretrained(save_tiny_sd(tmp_path_factory.mktemp("sd")))
    parts = {k: getattr(sd, k) for k in ("unet", "scheduler", "vae", "text_encoder", "tokenizer")}
    return parts, {"sigma_init": 2.5, "steps": 2, "teacher_pipeline": "StableDiffusionPipeline"}


@pytest.fixture
def sd(sd_parts):
    """A fresh pipeline of copies of the components (tests move, offload and empty them)."""
    parts, settings = sd_parts
    return SiDPipeline(**copy.deepcopy(parts), **settings)


def pixel_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)


def test_the_call_has_the_text_to_image_signature():
    parameters = dict(list(inspect.signature(SiDPipeline.__call__).parameters.items())[1:])
    assert TEXT_TO_IMAGE <= set(parameters)
    assert all(parameters[name].default is not inspect.Parameter.empty for name in OPTIONAL)


def test_pt_np_and_pil_outputs_agree_and_pt_is_in_0_1(sd):
    out = {kind: sd("a cat", generator=seeded(0), output_type=kind).images for kind in ("pt", "np", "pil", "latent")}
    assert out["pt"].min() >= 0 and out["pt"].max() <= 1 and out["pt"].shape == (1, 3, 16, 16)
    np.testing.assert_allclose(out["pt"].permute(0, 2, 3, 1).numpy(), out["np"], atol=1e-6)
    assert np.abs(np.asarray(out["pil"][0], dtype=np.float32) - (out["np"][0] * 255).round()).max() <= 1
    decoded = (sd.vae.decode(out["latent"] / sd.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out["pt"], decoded, rtol=1e-5, atol=1e-5)


def test_dict_and_tuple_outputs_are_equal(sd):
    as_dict = sd("a cat", generator=seeded(0), output_type="np").images
    as_tuple = sd("a cat", generator=seeded(0), output_type="np", return_dict=False)[0]
    np.testing.assert_array_equal(as_dict, as_tuple)


def test_a_batch_equals_its_images_drawn_one_by_one(sd):
    prompts = ["a cat", "a red dog", 100 * "very long "]                 # truncated to the tokenizer's length
    batch = sd(prompts, generator=seeded(0, 1, 2), output_type="np").images
    assert batch.shape[0] == 3
    for i, prompt in enumerate(prompts):
        np.testing.assert_allclose(batch[i], sd(prompt, generator=seeded(i), output_type="np").images[0], atol=1e-5)


@pytest.mark.parametrize("prompts,per_prompt", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_num_images_per_prompt(sd, prompts, per_prompt):
    images = sd(["a cat"] * prompts, num_images_per_prompt=per_prompt, output_type="np").images
    assert images.shape[0] == prompts * per_prompt


def test_images_per_prompt_follow_their_prompt(sd):
    """n images of each prompt, prompt by prompt (diffusers' order): each is its prompt's image for its noise."""
    images = sd(["a cat", "a red dog"], num_images_per_prompt=2, generator=seeded(0, 1, 2, 3),
                output_type="np").images
    for i, prompt in enumerate(["a cat", "a cat", "a red dog", "a red dog"]):
        np.testing.assert_allclose(images[i], sd(prompt, generator=seeded(i), output_type="np").images[0], atol=1e-5)


def test_prompt_embeds_give_the_prompts_images(sd):
    embeds = sd.encode_prompt(["a cat", "a red dog"], negative_prompt="blurry")
    assert embeds[2:] == (None, None, None, None)                        # SD has no pooled embeddings or masks
    for scale in (1.0, 3.0):
        by_prompt = sd(["a cat", "a red dog"], negative_prompt="blurry", guidance_scale=scale, generator=seeded(0, 1),
                       output_type="np").images
        by_embeds = sd(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], guidance_scale=scale,
                       generator=seeded(0, 1), output_type="np").images
        np.testing.assert_allclose(by_embeds, by_prompt, atol=1e-6)


def test_encode_prompt_works_in_isolation(sd_parts):
    """A pipeline of the text encoders alone encodes; one without them draws from the embeddings, as the whole."""
    parts, settings = sd_parts
    text = {k: (v if "text" in k or "tokenizer" in k else None) for k, v in parts.items()}
    embeds = SiDPipeline(**text).encode_prompt("a cat")
    rest = SiDPipeline(**{k: (None if "text" in k or "tokenizer" in k else v) for k, v in parts.items()}, **settings)
    alone = rest(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], guidance_scale=2.0,
                 generator=seeded(0), output_type="np").images
    whole = SiDPipeline(**parts, **settings)("a cat", guidance_scale=2.0, generator=seeded(0), output_type="np").images
    np.testing.assert_allclose(alone, whole, atol=1e-5)
    with pytest.raises(ValueError, match="text encoders are not loaded"):
        rest("a cat")


def test_pixart_passes_its_attention_masks(tmp_path):
    pixart = diffusers.PixArtAlphaPipeline.from_pretrained(save_tiny_pixart(tmp_path))
    pipe = SiDPipeline(transformer=pixart.transformer, scheduler=pixart.scheduler, vae=pixart.vae,
                       text_encoder=pixart.text_encoder, tokenizer=pixart.tokenizer,
                       teacher_pipeline="PixArtAlphaPipeline", sigma_init=2.5, max_sequence_length=8)
    embeds = pipe.encode_prompt("a cat")
    assert embeds[4] is not None and embeds[4].dtype == torch.int64 and embeds[2] is None
    by_prompt = pipe("a cat", generator=seeded(0), output_type="np").images
    by_embeds = pipe(prompt_embeds=embeds[0], prompt_attention_mask=embeds[4], negative_prompt_embeds=embeds[1],
                     negative_prompt_attention_mask=embeds[5], generator=seeded(0), output_type="np").images
    np.testing.assert_allclose(by_embeds, by_prompt, atol=1e-6)


def test_guidance_is_classifier_free_guidance_on_the_generator(sd):
    """guidance_scale = 1 is the generator as distilled; κ is D_u + κ (D_c − D_u) at each step, D_u the negative
    prompt's (by default the empty prompt's)."""
    z = torch.randn(1, 4, 8, 8, generator=seeded(5))
    one = sd("a cat", latents=z, output_type="latent", num_inference_steps=1).images
    denoiser = sd.denoiser()
    sigma = torch.full((1,), 2.5)
    cond, null = sd.encode_prompt("a cat", negative_prompt="blurry")[:2]
    with torch.no_grad():
        d_c, d_u = (denoiser(2.5 * z, sigma, {"text": c}) for c in (cond, null))
    torch.testing.assert_close(one, d_c, rtol=1e-5, atol=1e-5)
    guided = sd("a cat", negative_prompt="blurry", guidance_scale=4.0, latents=z, output_type="latent",
                num_inference_steps=1).images
    torch.testing.assert_close(guided, d_u + 4.0 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    default_null = sd("a cat", guidance_scale=4.0, latents=z, output_type="latent", num_inference_steps=1).images
    assert (default_null - guided).abs().max() > 1e-3


def test_cross_attention_kwargs_reach_the_network_a_lora_scale_included(sd):
    """A LoRA loaded on the UNet (peft), scaled by ``cross_attention_kwargs={"scale": s}`` as in stock pipelines:
    scale 0 is the network without it."""
    from peft import LoraConfig

    plain = sd("a cat", generator=seeded(0), output_type="np").images
    sd.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    with_lora = sd("a cat", generator=seeded(0), output_type="np").images
    assert np.abs(with_lora - plain).max() > 1e-3
    off = sd("a cat", generator=seeded(0), output_type="np", cross_attention_kwargs={"scale": 0.0}).images
    np.testing.assert_allclose(off, plain, atol=1e-6)
    assert not sd.unet._forward_pre_hooks                                # the hook is gone after the call


def test_height_and_width_set_the_latent_size(sd):
    assert sd("a cat", height=24, width=32, output_type="np").images.shape == (1, 24, 32, 3)
    with pytest.raises(ValueError, match="multiples of 2"):
        sd("a cat", height=25)


def test_callbacks_see_and_replace_each_steps_latents(sd):
    seen = []

    def watch(pipe, i, t, kwargs):
        assert set(kwargs) <= set(pipe._callback_tensor_inputs)
        seen.append((i, t))
        return kwargs

    sd("a cat", callback_on_step_end=watch, output_type="latent")
    assert [i for i, _ in seen] == [0, 1] and sd.num_timesteps == 2 and seen[0][1] == 2.5 > seen[1][1]

    def zero_last(pipe, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == pipe.num_timesteps - 1 else kwargs

    assert sd("a cat", callback_on_step_end=zero_last, output_type="latent").images.abs().sum() == 0

    def stronger(pipe, i, t, kwargs):
        pipe._guidance_scale += 1.0
        return kwargs

    sd("a cat", guidance_scale=2.0, callback_on_step_end=stronger)
    assert sd.guidance_scale == 2.0 + sd.num_timesteps
    with pytest.raises(ValueError, match="not among"):
        sd("a cat", callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_the_progress_bar_counts_steps_and_can_be_silenced(sd):
    with io.StringIO() as err, contextlib.redirect_stderr(err):
        sd("a cat")
        assert "2/2" in err.getvalue()
    sd.set_progress_bar_config(disable=True)
    with io.StringIO() as err, contextlib.redirect_stderr(err):
        sd("a cat")
        assert err.getvalue() == ""


def test_save_and_load_round_trip(sd, tmp_path):
    before = sd("a cat", generator=seeded(0), output_type="np").images
    sd.save_pretrained(tmp_path / "p", safe_serialization=False)
    loaded = SiDPipeline.from_pretrained(tmp_path / "p")
    assert loaded.config.steps == 2 and loaded.config.sigma_init == 2.5
    np.testing.assert_allclose(loaded("a cat", generator=seeded(0), output_type="np").images, before, atol=1e-6)


def test_variants_save_and_load_and_a_missing_one_is_an_error(sd, tmp_path):
    sd.save_pretrained(tmp_path / "v", variant="fp16")
    loaded = SiDPipeline.from_pretrained(tmp_path / "v", variant="fp16")
    for a, b in zip(sd.unet.parameters(), loaded.unet.parameters()):
        assert torch.equal(a, b)
    sd.save_pretrained(tmp_path / "plain", safe_serialization=False)
    with pytest.raises(ValueError, match="variant=fp16"):
        SiDPipeline.from_pretrained(tmp_path / "plain", variant="fp16")


def test_components_are_the_ones_held_and_rebuild_the_pipeline(sd):
    assert set(sd.components) == {"unet", "scheduler", "vae", "text_encoder", "tokenizer"}
    again = SiDPipeline(**sd.components, **{k: sd.config[k] for k in ("sigma_init", "steps")})
    np.testing.assert_array_equal(again("a cat", generator=seeded(0), output_type="np").images,
                                  sd("a cat", generator=seeded(0), output_type="np").images)
    unet = pixel_unet()                                   # an EDM export's components say all it is
    edm = SiDPipeline(unet=unet, scheduler=EDMEulerScheduler(sigma_min=1.5, sigma_max=1.5))
    assert set(edm.components) == {"unet", "scheduler"} and edm.config.sigma_init == 1.5
    assert edm.config.prediction_type == "edm"


def test_optional_components_stay_none_through_a_round_trip(sd, tmp_path):
    for name in sd._optional_components:
        setattr(sd, name, None)
    before = sd("a cat", generator=seeded(0), output_type="np").images
    sd.save_pretrained(tmp_path / "o", safe_serialization=False)
    loaded = SiDPipeline.from_pretrained(tmp_path / "o")
    assert all(getattr(loaded, name) is None for name in sd._optional_components)
    np.testing.assert_allclose(loaded("a cat", generator=seeded(0), output_type="np").images, before, atol=1e-6)


def test_from_pipe_keeps_every_component_both_ways(sd, sd_parts):
    again = SiDPipeline.from_pipe(sd)
    assert all(again.components[k] is v for k, v in sd.components.items()) and again.config.steps == 2
    np.testing.assert_array_equal(again("a cat", generator=seeded(0), output_type="np").images,
                                  sd("a cat", generator=seeded(0), output_type="np").images)
    stock = diffusers.StableDiffusionPipeline.from_pipe(sd, safety_checker=None, feature_extractor=None)
    assert stock.unet is sd.unet and stock.vae is sd.vae and stock.text_encoder is sd.text_encoder
    teacher = diffusers.StableDiffusionPipeline(**sd_parts[0], safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    student = SiDPipeline.from_pipe(teacher, sigma_init=2.5, steps=2)
    assert student.unet is teacher.unet and set(student.components) == set(sd.components)


def test_to_dtype_moves_every_network(sd):
    sd.to(dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in sd.components.values() if isinstance(v, torch.nn.Module))


def test_attention_slicing_leaves_the_images_alone(sd):
    plain = sd("a cat", generator=seeded(0), output_type="np").images
    for slice_size in (1, 2):
        sd.enable_attention_slicing(slice_size=slice_size)
        np.testing.assert_allclose(sd("a cat", generator=seeded(0), output_type="np").images, plain, atol=1e-5)


def test_model_offload_leaves_the_images_alone(sd):
    """Offloading (here to the CPU itself: the machinery diffusers uses for a GPU) hooks every network and draws
    the noise on the execution device."""
    plain = sd("a cat", generator=seeded(0), output_type="np").images
    sd.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(v, "_hf_hook") for v in sd.components.values() if isinstance(v, torch.nn.Module))
    np.testing.assert_allclose(sd("a cat", generator=seeded(0), output_type="np").images, plain, atol=1e-5)


def test_a_pixel_generator_takes_batch_size_class_labels_and_no_prompt():
    unet = pixel_unet()
    pipe = SiDPipeline(unet=unet, scheduler=DDPMScheduler(), sigma_init=2.5)
    assert pipe.config.prediction_type == "epsilon" and pipe.family is None
    images = pipe(batch_size=2, num_images_per_prompt=2, generator=seeded(0, 1, 2, 3), output_type="pt").images
    assert images.shape == (4, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    raw = pipe(batch_size=1, generator=seeded(0), output_type="latent").images
    torch.testing.assert_close(images[:1], (raw / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)
    unguided = pipe(batch_size=1, generator=seeded(0), guidance_scale=7.5, output_type="latent").images
    torch.testing.assert_close(unguided, raw)                        # nothing to guide
    assert pipe(batch_size=1, height=16, width=8, output_type="np").images.shape == (1, 16, 8, 1)
    with pytest.raises(ValueError, match="takes no prompt"):
        pipe("a cat")
    assert math.isclose(pipe.config.sigma_init, 2.5)
