"""Tiny latent text-to-image pipelines built from configs, saved as a user's pipeline folders are (offline: the
tokenizer's vocabulary is written here)."""

import json
from pathlib import Path

import torch


def teacher_of(folder):
    """The sid teacher of a diffusers pipeline folder (or hub id)."""
    from sid.config import load_config
    from sid.teachers import build_teacher

    return build_teacher(load_config([], ["teacher.kind=diffusers", f"teacher.diffusers.path={folder}"]).teacher)


def tiny_tokenizer(folder: Path):
    """A CLIP tokenizer with a vocabulary of single letters (unknown pieces map to the end-of-text token)."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def save_tiny_sd(root: Path, prediction_type: str = "epsilon") -> Path:
    """A StableDiffusionPipeline of random tiny components (latents 4×8×8, images 16×16) in ``root/pipeline``."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = tiny_vae()
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1,
                                                 prediction_type=prediction_type)
    pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                             tokenizer=tiny_tokenizer(root / "vocab"), scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def tiny_vae(**scaling):
    """A 2-level AutoencoderKL (latents 4 × H/2 × W/2); ``scaling``: its scaling_factor and shift_factor."""
    import diffusers

    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16,
                                   **scaling)


def save_tiny_dit(root: Path) -> Path:
    """A DiTPipeline of random tiny components (a class-conditional DiTTransformer2DModel with learned variance
    over 1000 classes, latents 4×8×8, images 16×16) in ``root/dit``."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                  out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                                  num_embeds_ada_norm=1000)
    scheduler = diffusers.DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    diffusers.DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler).save_pretrained(root / "dit")
    return root / "dit"


def save_tiny_clip(root: Path) -> Path:
    """A CLIPModel (text and vision towers of width 16, 32-px images) with its CLIPProcessor in ``root/clip``,
    as torchmetrics' CLIPScore loads a local model."""
    import transformers

    torch.manual_seed(1)
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=tiny_tokenizer(root / "clip-vocab"))
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    return root / "clip"


class MeanStd(torch.nn.Module):
    """Image features for FID in tests: each channel's mean and std (a fast stand-in for Inception)."""

    def forward(self, x):
        return torch.cat([x.float().mean(dim=(2, 3)), x.float().std(dim=(2, 3))], dim=1)


def save_feature_extractor(path: Path) -> Path:
    torch.jit.save(torch.jit.script(MeanStd()), str(path))
    return path


def tiny_clip_encoder(projection: bool = False, hidden: int = 16, seed: int = 0):
    """A 2-layer CLIP text encoder over the tiny vocabulary (``CLIPTextModelWithProjection`` when ``projection``)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=hidden)
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config)


def tiny_t5(folder: Path, d_model: int = 32, seed: int = 3):
    """A one-layer T5 encoder and a T5 tokenizer over single letters (a unigram vocabulary written here)."""
    import transformers

    torch.manual_seed(seed)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -1.0) for c in "abcdefghijklmnopqrstuvwxyz" for piece in ("▁" + c, c)]
    tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return encoder, tokenizer


def save_tiny_sdxl(root: Path) -> Path:
    """A StableDiffusionXLPipeline of random tiny components (two CLIP encoders side by side, the second's pooled
    projection and the micro-conditioning time ids; latents 4×8×8, images 16×16) in ``root/sdxl``."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    diffusers.StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(), scheduler=scheduler, text_encoder=tiny_clip_encoder(seed=1),
        text_encoder_2=tiny_clip_encoder(projection=True, seed=2), tokenizer=tiny_tokenizer(root / "vocab"),
        tokenizer_2=tiny_tokenizer(root / "vocab-2")).save_pretrained(root / "sdxl")
    return root / "sdxl"


def save_tiny_sd3(root: Path, t5: bool = True) -> Path:
    """A StableDiffusion3Pipeline of random tiny components (an SD3Transformer2DModel on flow matching with
    shift 3, two CLIP encoders and a T5 (or none), a VAE with a shift factor; latents 4×8×8, images 16×16) in
    ``root/sd3``."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=8)
    encoder_3, tokenizer_3 = tiny_t5(root / "t5") if t5 else (None, None)
    diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5305),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=tiny_clip_encoder(projection=True, seed=1), tokenizer=tiny_tokenizer(root / "vocab"),
        text_encoder_2=tiny_clip_encoder(projection=True, seed=2), tokenizer_2=tiny_tokenizer(root / "vocab-2"),
        text_encoder_3=encoder_3, tokenizer_3=tokenizer_3).save_pretrained(root / "sd3")
    return root / "sd3"


def save_tiny_pixart(root: Path, sigma: bool = False) -> Path:
    """A PixArtAlphaPipeline (or PixArtSigmaPipeline) of random tiny components (a PixArtTransformer2DModel with
    learned variance, a T5 encoder with its attention mask; latents 4×8×8, images 16×16) in ``root/pixart``."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    encoder, tokenizer = tiny_t5(root / "t5")
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                                 timestep_spacing="leading", steps_offset=1)
    cls = diffusers.PixArtSigmaPipeline if sigma else diffusers.PixArtAlphaPipeline
    cls(transformer=transformer, vae=tiny_vae(), scheduler=scheduler, text_encoder=encoder,
        tokenizer=tokenizer).save_pretrained(root / "pixart")
    return root / "pixart"


def save_tiny_sana(root: Path) -> Path:
    """A SanaPipeline of random tiny components (a SanaTransformer2DModel on flow matching, a Gemma 2 encoder with a
    Gemma tokenizer over single characters, a deep-compression AutoencoderDC; latents 4×16×16, images 32×32) in
    ``root/sana``."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "abcdefghijklmnopqrstuvwxyz▁":
        vocab[c] = len(vocab)
    encoder = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096))
    transformer = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=32,
        sample_size=16)
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    tokenizer = transformers.GemmaTokenizer(vocab=vocab, merges=[])
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    diffusers.SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                           scheduler=scheduler).save_pretrained(root / "sana")
    return root / "sana"


def save_tiny_flux(root: Path, dev: bool = True) -> Path:
    """A FluxPipeline of random tiny components (a FluxTransformer2DModel over 2×2-packed latents, with a guidance
    embedding as FLUX.1-dev, or without as FLUX.1-schnell; CLIP's pooled output and a T5; a VAE with FLUX's scaling and
    shift; the dev scheduler's resolution-dependent shift; latents 4×8×8, images 16×16) in ``root/flux``."""
    import diffusers

    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=dev, axes_dims_rope=(2, 2, 4))
    encoder_2, tokenizer_2 = tiny_t5(root / "t5")
    scheduler = (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                           max_shift=1.15, base_image_seq_len=256,
                                                           max_image_seq_len=4096)
                 if dev else diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
    diffusers.FluxPipeline(
        transformer=transformer, vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611), scheduler=scheduler,
        text_encoder=tiny_clip_encoder(seed=1), tokenizer=tiny_tokenizer(root / "vocab"), text_encoder_2=encoder_2,
        tokenizer_2=tokenizer_2).save_pretrained(root / "flux")
    return root / "flux"


# The tiny latent pipelines by family (``tiny_pipeline`` in conftest builds each once per session).
BUILDERS = {"sd": save_tiny_sd, "sd-v": lambda root: save_tiny_sd(root, "v_prediction"), "sdxl": save_tiny_sdxl,
            "sd3": save_tiny_sd3,
            "sd3-without-t5": lambda root: save_tiny_sd3(root, t5=False), "pixart": save_tiny_pixart,
            "pixart-sigma": lambda root: save_tiny_pixart(root, sigma=True), "sana": save_tiny_sana,
            "dit": save_tiny_dit, "flux": save_tiny_flux, "flux-schnell": lambda root: save_tiny_flux(root, dev=False)}
