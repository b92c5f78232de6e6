"""A Stable Diffusion 1.x generator as one checkpoint file in the original (CompVis latent-diffusion) layout, the
form ComfyUI, A1111 and ``StableDiffusionPipeline.from_single_file`` read: the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.``, the CLIP text encoder under
``cond_stage_model.transformer.``, as safetensors.

The renaming is the inverse of the one diffusers applies when it reads such a file: the UNet's blocks become
LDM's flat ``input_blocks`` / ``middle_block`` / ``output_blocks`` (each down block's resnets and attentions at
positions i (n + 1) + j + 1, its downsampler after them; up blocks likewise, n + 1 layers each), resnets' and the
VAE's layer names their LDM names, and the VAE's attention projections 1×1 convolutions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
import transformers
from safetensors.torch import save_file
from torch import nn

from sid.errors import SidError, described
from sid.teachers.diffusers.exchange import export_folder
from sid.teachers.diffusers.export import written_form

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def renamed(key: str, table: dict) -> str:
    """``key`` with its first dotted part found in ``table`` replaced (``norm1.weight`` -> ``in_layers.0.weight``)."""
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key


def unet_to_ldm(state: dict, config) -> dict:
    """A ``UNet2DConditionModel``'s weights under LDM's names (``model.diffusion_model.`` added)."""
    n = config["layers_per_block"]
    blocks = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
    for i in range(len(config["down_block_types"])):
        for j in range(n):
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{i * (n + 1) + j + 1}.0"
            blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{i * (n + 1) + j + 1}.1"
        blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (n + 1)}.0.op"
    for i, kind in enumerate(config["up_block_types"]):
        for j in range(n + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (n + 1) + j}.0"
            blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (n + 1) + j}.1"
        after = 2 if "CrossAttn" in kind else 1             # the upsampler follows the block's last layer
        blocks[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (n + 1) + n}.{after}.conv"
    out = {}
    for key, value in state.items():
        for old, new in blocks.items():
            if key.startswith(old + "."):
                rest = key[len(old) + 1:]
                key = f"{new}.{renamed(rest, RESNET) if 'resnets.' in old else rest}"
                break
        out[f"model.diffusion_model.{key}"] = value
    return out


def vae_to_ldm(state: dict, config) -> dict:
    """An ``AutoencoderKL``'s weights under LDM's names (``first_stage_model.`` added); its attention's linear
    projections as 1×1 convolutions."""
    levels = len(config["block_out_channels"])
    blocks = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        blocks[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        for k in range(2):
            blocks[f"{part}.mid_block.resnets.{k}"] = f"{part}.mid.block_{k + 1}"
    for i in range(levels):
        blocks[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        blocks[f"encoder.down_blocks.{i}.resnets"] = f"encoder.down.{i}.block"
        blocks[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
        blocks[f"decoder.up_blocks.{i}.resnets"] = f"decoder.up.{levels - 1 - i}.block"
    out = {}
    for key, value in state.items():
        for old, new in blocks.items():
            if key.startswith(old + "."):
                key = new + key[len(old):]
                break
        if ".attn_1." in key:
            prefix, _, rest = key.partition(".attn_1.")
            key = f"{prefix}.attn_1.{renamed(rest, VAE_ATTENTION)}"
            value = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value
        key = key.replace("conv_shortcut", "nin_shortcut")
        out[f"first_stage_model.{key}"] = value
    return out


def single_file_state(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict:
    """The three networks' weights as one LDM checkpoint's."""
    state = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    state.update({f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
                  for k, v in text_encoder.state_dict().items()})      # CLIPTextModel, flattened or not
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_single_file(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, out: Path,
                      metadata: dict | None = None) -> Path:
    """A Stable Diffusion 1.x UNet, VAE and CLIP text encoder as one safetensors file at ``out`` (written beside,
    then renamed); ``metadata``: strings stored in its header."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(single_file_state(unet, vae, text_encoder), tmp, metadata=metadata or {})
        os.replace(tmp, out)
    except OSError as e:
        raise SidError(f"could not write {out} ({described(e)}); free space and run again") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_single_file(path, out=None) -> tuple[Path, str]:
    """The Stable Diffusion 1.x generator of a run (or an export) as one checkpoint file, ``out`` (default: beside
    the export, ``<run>/<run name>-<export name>.safetensors``), with sid's record and the one-step call in its
    metadata; returns the file and how to sample it."""
    folder = export_folder(Path(path))
    record = json.loads((folder / "generator.json").read_text())
    if record["denoiser"].get("pipeline") != "StableDiffusionPipeline":
        raise SidError(f"a single-file checkpoint is written for Stable Diffusion 1.x generators; {folder} was "
                       f"distilled from a {record['denoiser'].get('pipeline') or 'pixel-space UNet'}: its export "
                       "folder is the form to share")
    try:
        networks = {name: cls.from_pretrained(folder, subfolder=name) for name, cls in
                    (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL),
                     ("text_encoder", transformers.CLIPTextModel))}
    except (OSError, ValueError) as e:
        raise SidError(f"{folder}: its unet/, vae/ or text_encoder/ cannot be loaded ({type(e).__name__}); a "
                       "single-file checkpoint needs a Stable Diffusion 1.x export with a CLIP text encoder") from None
    form = written_form(folder, record)
    how = (f"diffusers: StableDiffusionPipeline.from_single_file(file, config={str(folder)!r}) (its configs and "
           f"one-step scheduler), then {form.call_text()}" if form is not None else
           f"diffusers: StableDiffusionPipeline.from_single_file(file, config={str(folder)!r}), sampled as the "
           "export's card says")
    metadata = {"sid": json.dumps({k: record.get(k) for k in ("sigma_init", "steps", "renoise", "shape", "nimg")}),
                "sid_sampling": how}
    out = Path(out) if out is not None else folder.parent / f"{folder.parent.resolve().name}-{folder.name}.safetensors"
    return write_single_file(networks["unet"], networks["vae"], networks["text_encoder"], out, metadata), how
