"""The memory plans of the big teachers, from their published architectures: Stable Diffusion 1.5, SDXL base and
SD3 medium, each with the settings of its preset (SDXL: SiD-LSG's, the sd15_lsg preset, in bf16 with activation
checkpointing, at its 1024 px): full students on one GPU and sharded over a node of eight, and LoRA students on one
GPU (their rows hold the adapters where the full students' hold the weights).

    python -m eval.memory_plans --out runs/memory_plans

No weights are needed or read: each pipeline is written as a folder of its components' configs (the values
published with the models on the Hugging Face Hub, below), and the plan (sid/memory.py) builds its networks on the
meta device. The tokenizers are small stand-ins of the real lengths (77 CLIP tokens, 256 T5 tokens): only the
shapes of the conditions matter to the plan. Writes plans.md to --out and prints it.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
           norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

PIPELINES = {
    "Stable Diffusion 1.5": {
        "_class_name": "StableDiffusionPipeline", "preset": "sd15_lsg", "overrides": [],
        "unet": ("UNet2DConditionModel", dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=[320, 640, 1280, 1280],
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768, attention_head_dim=8)),
        "scheduler": ("DDIMScheduler", SCALED_LINEAR),
        "vae": ("AutoencoderKL", VAE),
        "text_encoder": ("CLIPTextModel", CLIP_L),
    },
    "Stable Diffusion XL base": {
        "_class_name": "StableDiffusionXLPipeline", "preset": "sd15_lsg",
        "overrides": ["train.precision=auto", "perf.grad_checkpointing=true"],
        "unet": ("UNet2DConditionModel", dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
        "scheduler": ("EulerDiscreteScheduler", SCALED_LINEAR),
        "vae": ("AutoencoderKL", {**VAE, "scaling_factor": 0.13025, "sample_size": 1024}),
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
    },
    "Stable Diffusion 3 medium": {
        "_class_name": "StableDiffusion3Pipeline", "preset": "sd3_medium_dit", "overrides": [],
        "transformer": ("SD3Transformer2DModel", dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=192)),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
        "vae": ("AutoencoderKL", {**VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
                                  "scaling_factor": 1.5305, "shift_factor": 0.0609, "sample_size": 1024}),
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("T5EncoderModel", T5_XXL),
    },
}


def write_pipeline(spec: dict, root: Path) -> Path:
    """A pipeline folder of configs alone (no weights), with stand-in tokenizers of the real lengths."""
    import diffusers
    import transformers

    index = {"_class_name": spec["_class_name"]}
    for name, value in spec.items():
        if name in ("_class_name", "preset", "overrides"):
            continue
        cls, config = value
        if hasattr(diffusers, cls):                     # a model's or scheduler's config, as save_pretrained names it
            index[name] = ["diffusers", cls]
            (root / name).mkdir(parents=True)
            filename = "scheduler_config.json" if name == "scheduler" else "config.json"
            (root / name / filename).write_text(json.dumps({"_class_name": cls, **config}))
        else:
            index[name] = ["transformers", cls]
            getattr(transformers, cls).config_class(**config).save_pretrained(root / name)
            suffix = name[len("text_encoder"):]
            tokenizer = stand_in_tokenizer(cls, root / f"vocab{suffix}")
            tokenizer.save_pretrained(root / f"tokenizer{suffix}")
            index[f"tokenizer{suffix}"] = ["transformers", type(tokenizer).__name__]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def stand_in_tokenizer(encoder: str, folder: Path):
    """A tokenizer over single letters with the real one's length: CLIP's 77, or T5 (any length; the pipelines pad
    it to theirs)."""
    import transformers

    letters = "abcdefghijklmnopqrstuvwxyz"
    if encoder.startswith("T5"):
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("▁" + c, -1.0) for c in letters)]
        return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c + "</w>": i + 2 for i, c in enumerate(letters)}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


LAUNCHES = {"1 GPU": (1, False), "8 GPUs, sharded": (8, True)}
STUDENTS = {"full students": [], "LoRA students (rank 64)": ["lora.fake_score=true", "lora.generator=true"]}


def plans(out: Path) -> str:
    from sid.config import load_config
    from sid.memory import gib, plan

    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, spec in PIPELINES.items():
            folder = write_pipeline(spec, Path(tmp) / spec["_class_name"])
            overrides = spec["overrides"]
            lines = [f"### {title}", ""]
            header = None
            for students, extra in STUDENTS.items():
                for launch, (processes, sharded) in LAUNCHES.items():
                    if extra and sharded:                   # LoRA students share the teacher: not sharded
                        continue
                    cfg = load_config([spec["preset"]], [f"teacher.diffusers.path={folder}", *overrides, *extra,
                                                         f"train.run_dir={tmp}/run"])
                    result = plan(cfg, processes, sharded)
                    if header is None:
                        header = [what for what, _ in result.rows]
                        lines.append(f"`--config {spec['preset']}`" + (f" with {' '.join(overrides)}" if overrides
                                                                       else "") + f", micro-batch "
                                     f"{result.batch_gpu}; {result.notes[0]}; {result.notes[1]}.")
                        lines += ["", "| | " + " | ".join(header) + " | total |",
                                  "|---" * (len(header) + 2) + "|"]
                    cells = [gib(b) for _, b in result.rows]          # the same rows in the same order
                    lines.append(f"| {students}, {launch} | " + " | ".join(cells) + f" | **{gib(result.total)}** |")
            sections.append("\n".join(lines))
    text = "\n\n".join(sections)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.md").write_text(text + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.memory_plans", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/memory_plans")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(plans(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
