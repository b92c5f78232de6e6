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
    folder.mkdir(parents=True)
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


def tiny_vae():
    import diffusers

    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16)


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
