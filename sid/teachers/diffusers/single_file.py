"""A Stable Diffusion 1.x or SDXL generator as one checkpoint file in the original (latent-diffusion / SGM) layout,
the form ComfyUI, A1111 and the pipelines' ``from_single_file`` read: the UNet under ``model.diffusion_model.``,
the VAE under ``first_stage_model.``, the text encoders under ``cond_stage_model.transformer.`` (SD 1.x's CLIP) or
``conditioner.embedders.0.transformer.`` and ``conditioner.embedders.1.model.`` (SDXL's CLIP and, in OpenCLIP's
names, its second encoder), as safetensors.

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
import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",    # SDXL
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


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """A transformers ``CLIPTextModel``'s weights under ``prefix`` + ``text_model.``… (flattened or not)."""
    return {f"{prefix}{k if k.startswith('text_model.') else 'text_model.' + k}": v for k, v in state.items()}


def open_clip_to_ldm(state: dict, prefix: str) -> dict:
    """A ``CLIPTextModelWithProjection``'s weights under OpenCLIP's names (SDXL's second encoder): ``resblocks``,
    q, k and v stacked as ``attn.in_proj_*``, the projection transposed."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {"positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "text_projection": state.pop("text_projection.weight").T}
    state.pop("embeddings.position_ids", None)
    layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for key in [k for k in state if k.startswith("encoder.layers.") and ".self_attn.q_proj." in k]:
        i, kind = key.split(".")[2], key.rsplit(".", 1)[1]                          # weight or bias
        stacked = [state.pop(f"encoder.layers.{i}.self_attn.{x}_proj.{kind}") for x in "qkv"]
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(stacked)
    for key, value in state.items():
        if key.startswith("encoder.layers."):
            i, rest = key.split(".", 3)[2:]
            out[f"transformer.resblocks.{i}.{renamed(rest, layer)}"] = value
        else:
            out[renamed(key, {"final_layer_norm": "ln_final"})] = value
    return {prefix + k: v for k, v in out.items()}


LAYOUTS = {   # the text encoders' places in each family's single file
    "StableDiffusionPipeline": {"text_encoder": (clip_to_ldm, "cond_stage_model.transformer.")},
    "StableDiffusionXLPipeline": {"text_encoder": (clip_to_ldm, "conditioner.embedders.0.transformer."),
                                  "text_encoder_2": (open_clip_to_ldm, "conditioner.embedders.1.model.")}}
ENCODERS = {"text_encoder": transformers.CLIPTextModel, "text_encoder_2": transformers.CLIPTextModelWithProjection}


def single_file_state(pipeline: str, networks: dict) -> dict:
    """The networks of a ``pipeline`` (``unet``, ``vae`` and its text encoders) as one LDM checkpoint's weights."""
    unet, vae = networks["unet"], networks["vae"]
    state = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    for name, (convert, prefix) in LAYOUTS[pipeline].items():
        state.update(convert(networks[name].state_dict(), prefix))
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_single_file(pipeline: str, networks: dict, out: Path, metadata: dict | None = None) -> Path:
    """A Stable Diffusion 1.x or SDXL pipeline's networks as one safetensors file at ``out`` (written beside, then
    renamed); ``metadata``: strings stored in its header."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(single_file_state(pipeline, networks), tmp, metadata=metadata or {})
        os.replace(tmp, out)
    except OSError as e:
        raise SidError(f"could not write {out} ({described(e)}); free space and run again") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def written_here(path: Path) -> bool:
    """Whether ``path`` is a single file this module wrote (its header names how to sample it)."""
    try:
        with safe_open(str(path), "pt") as f:
            return "sid_sampling" in (f.metadata() or {})
    except (OSError, SafetensorError):                  # not safetensors at all
        return False


def export_single_file(path, out=None) -> tuple[Path, str]:
    """The Stable Diffusion 1.x or SDXL generator of a run (or an export) as one checkpoint file, ``out`` (default:
    beside the export, ``<run>/<run name>-<export name>.safetensors``), with sid's record and the one-step call in
    its metadata; returns the file and how to sample it."""
    folder = export_folder(path)
    record = json.loads((folder / "generator.json").read_text())
    pipeline = record["denoiser"].get("pipeline")
    if pipeline not in LAYOUTS:
        raise SidError(f"a single-file checkpoint is written for Stable Diffusion 1.x and SDXL generators; {folder} "
                       f"was distilled from a {pipeline or 'pixel-space UNet'}: its export folder is the form to share")
    out = Path(out) if out is not None else folder.parent / f"{folder.parent.resolve().name}-{folder.name}.safetensors"
    if out.exists() and not written_here(out):
        raise SidError(f"{out} exists and is not a single file written by sid: give another --out (nothing was "
                       "overwritten)")
    classes = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
               **{name: ENCODERS[name] for name in LAYOUTS[pipeline]}}
    try:
        networks = {name: cls.from_pretrained(folder, subfolder=name) for name, cls in classes.items()}
    except (OSError, ValueError) as e:
        raise SidError(f"{folder}: its {', '.join(f'{n}/' for n in classes)} cannot all be loaded "
                       f"({type(e).__name__}); a single file holds every one of them") from None
    form = written_form(folder, record)
    how = (f"diffusers: {pipeline}.from_single_file(file, config={str(folder)!r}) (its configs and one-step "
           f"scheduler), then {form.call_text()}" if form is not None else
           f"diffusers: {pipeline}.from_single_file(file, config={str(folder)!r}), sampled as the export's card says")
    metadata = {"sid": json.dumps({k: record.get(k) for k in ("sigma_init", "steps", "renoise", "shape", "nimg")}),
                "sid_sampling": how}
    return write_single_file(pipeline, networks, out, metadata), how
