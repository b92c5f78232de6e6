"""A distilled network in the form people exchange it: a LoRA on its teacher that stock diffusers loads
(``pipe.load_lora_weights(folder)``, its alpha honoured through the adapter metadata diffusers writes).

A LoRA student's adapter is that LoRA exactly (its rank and α as trained). A full student's difference to the
teacher, ΔW = W_student − W_teacher, is written as the rank-r truncated SVD of each Linear and Conv2d weight's
ΔW (flattened to out × in·k·k): ΔW ≈ B A with B = U_r √S_r, A = √S_r V_rᵀ, α = r (Eckart–Young: the best rank-r
approximation in Frobenius norm). What the SVD drops is measured and said, and so are the differences no LoRA can
carry (biases, norms, embeddings).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import diffusers
import torch
from safetensors.torch import load_file
from torch import nn

from sid.errors import SidError, described
from sid.steps import generate
from sid.teachers.diffusers.export import load_native, written_form
from sid.teachers.diffusers.families import FAMILIES
from sid.teachers.diffusers.files import export_dir
from sid.teachers.diffusers.latent import export_codec
from sid.teachers.diffusers.models import model_of

LORA_FILE = "pytorch_lora_weights.safetensors"
SEEDS = range(4)


def lora_pipeline(name: str | None) -> tuple[type, str]:
    """(the stock pipeline class, the network's component) of a family whose pipeline loads LoRAs; one line for
    the others."""
    slot = lora_slot(name)
    if slot is None:
        readers = sorted(family for family in FAMILIES if lora_slot(family))
        raise SidError(f"diffusers loads no LoRA into a {name or 'pixel-space UNet'} pipeline, so this generator "
                       f"has no LoRA form; its export folder is the full network. LoRA forms exist for "
                       f"{', '.join(readers)}")
    return getattr(diffusers, name), slot


def lora_slot(name: str | None) -> str | None:
    """The component a pipeline class loads LoRAs into (its network: ``unet`` or ``transformer``), or None."""
    slots = getattr(getattr(diffusers, name, None) if name else None, "_lora_loadable_modules", None) or ()
    return next((s for s in ("unet", "transformer") if s in slots), None)


def adapter_lora(folder: Path) -> tuple[dict, dict]:
    """(state, LoraConfig dict) of a LoRA student's adapter as sid saves it (``lora.save_adapter``: peft's
    ``adapter_model.safetensors`` and ``adapter_config.json``, keys relative to the teacher's network)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        state = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as e:
        raise SidError(f"{folder}: the adapter cannot be read ({described(e)}); export the run again") from None
    return state, config


def layers(network: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers of a network, by name: the ones a LoRA can change."""
    return {name: m for name, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@torch.no_grad()
def extract_lora(student: nn.Module, teacher: nn.Module, rank: int) -> tuple[dict, dict, dict]:
    """(state, LoraConfig dict, report) of the rank-``rank`` LoRA closest to ``student`` − ``teacher`` (same
    architecture) in each layer: truncated SVD in float64, padded with zero directions where a layer's ΔW has
    fewer. The report: the relative Frobenius error of the carried ΔW (all layers together and the worst layer),
    and the tensors that differ but are not LoRA weights, with their share of ‖Δ‖."""
    if rank < 1:
        raise SidError(f"--rank {rank}: a LoRA's rank is at least 1")
    teacher_layers, state, targets = layers(teacher), {}, []
    kept = dropped = worst = 0.0
    for name, layer in layers(student).items():
        base = teacher_layers.get(name)
        if base is None or base.weight.shape != layer.weight.shape:
            raise SidError(f"the student's {name} has no counterpart of its shape in the teacher: the LoRA is a "
                           "difference to the teacher the run distilled; give that teacher")
        delta = (layer.weight.double() - base.weight.double()).flatten(1)
        if not delta.any():
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, len(s))
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        if r < rank:                                         # zero directions: every layer has rank ``rank``
            b, a = nn.functional.pad(b, (0, rank - r)), nn.functional.pad(a, (0, 0, 0, rank - r))
        lost = float(s[r:].square().sum())
        kept, dropped = kept + float(s.square().sum()), dropped + lost
        worst = max(worst, math.sqrt(lost / float(s.square().sum())))
        shape = layer.weight.shape
        a = a.reshape(rank, *shape[1:]) if layer.weight.ndim == 4 else a
        b = b.reshape(shape[0], rank, 1, 1) if layer.weight.ndim == 4 else b
        state[f"{name}.lora_A.weight"] = a.float().contiguous()
        state[f"{name}.lora_B.weight"] = b.float().contiguous()
        targets.append(name)
    if not targets:
        raise SidError("the student's weights equal the teacher's: there is no difference to write as a LoRA")
    carried = {f"{name}.weight" for name in layers(student)}             # in the LoRA, or equal
    teacher_state = teacher.state_dict()
    others = {k: float((v.double() - teacher_state[k].double()).square().sum())
              for k, v in student.state_dict().items() if k not in carried and v.is_floating_point()}
    others = {k: v for k, v in others.items() if v > 0}
    total = kept + sum(others.values())
    report = {"rank": rank, "layers": len(targets), "svd_error": math.sqrt(dropped / kept), "worst_layer": worst,
              "not_carried": sorted(others), "not_carried_share": math.sqrt(sum(others.values()) / total)}
    return state, {"r": rank, "lora_alpha": rank, "target_modules": targets}, report


@torch.no_grad()
def apply_lora(network: nn.Module, state: dict, config: dict) -> nn.Module:
    """``network`` with the LoRA merged into its weights, W + (α / r) B A, in place (what ``fuse_lora`` does)."""
    scale = config["lora_alpha"] / config["r"]
    for name, layer in layers(network).items():
        a, b = state.get(f"{name}.lora_A.weight"), state.get(f"{name}.lora_B.weight")
        if a is not None:
            product = b.double().flatten(1) @ a.double().flatten(1)
            layer.weight += (scale * product).reshape(layer.weight.shape).to(layer.weight)
    return network


def check_replaceable(folder: Path) -> None:
    """One line where ``folder`` holds anything but a LoRA written here (it is replaced whole: an export or any
    other folder given as ``--out`` must never be)."""
    others = sorted(p.name for p in Path(folder).iterdir() if p.name not in (LORA_FILE, "README.md")) \
        if Path(folder).is_dir() else []
    if others:
        raise SidError(f"{folder} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                       "a LoRA's folder is replaced whole: give a new or empty folder with --out")


def write_lora(folder: Path, pipeline: type, slot: str, state: dict, config: dict, card: str) -> None:
    """The LoRA as diffusers' ``save_lora_weights`` writes it for ``pipeline`` (keys under ``slot``, the LoraConfig
    in the file's metadata, so that ``load_lora_weights`` honours α), with a card; written beside, then moved in
    (over a LoRA written before, never over other files)."""
    folder = Path(folder)
    check_replaceable(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    metadata = {"r": config["r"], "lora_alpha": config["lora_alpha"],
                "target_modules": sorted(config["target_modules"])}
    try:
        pipeline.save_lora_weights(tmp, safe_serialization=True, **{f"{slot}_lora_layers": state,
                                                                    f"{slot}_lora_adapter_metadata": metadata})
        (tmp / "README.md").write_text(card)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:
        raise SidError(f"could not write the LoRA to {folder} ({described(e)}); free space and run again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_folder(path) -> Path:
    """The export folder of a run folder or of the export itself (``files.export_dir``), holding sid's record."""
    folder = export_dir(path)
    if not (folder / "generator.json").is_file():
        raise SidError(f"{path} is neither a run folder nor an export (no generator.json); give the run's folder")
    return folder


def network_of(class_name: str, folder: str, slot: str) -> nn.Module:
    """The diffusers network of a pipeline folder (or hub id), in float32."""
    try:
        return getattr(diffusers, class_name).from_pretrained(folder, subfolder=slot, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SidError(f"the {slot} cannot be loaded from {folder} ({type(e).__name__}); the LoRA is a difference "
                       "to the teacher the run distilled: give its folder with --teacher") from None


@torch.no_grad()
def fidelity(folder: Path, teacher_net: nn.Module, state: dict, config: dict, prompt: str) -> dict:
    """The LoRA generator (the teacher's network with the LoRA merged) against the export, from the noise of
    ``SEEDS``: the relative error ‖x_LoRA − x‖ / ‖x‖, and the share of the student's change from the teacher it
    misses, ‖x_LoRA − x‖ / ‖x_teacher − x‖."""
    denoiser, shape, sigma_init, steps, renoise = load_native(folder)
    codec = export_codec(folder)
    cond = codec.encode([prompt] * len(SEEDS)) if codec is not None and codec.text_to_image else None
    z = torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    outputs = []
    for weights in (None, apply_lora(copy.deepcopy(teacher_net), state, config), teacher_net):
        if weights is not None:
            model_of(denoiser).load_state_dict(weights.state_dict())
        torch.manual_seed(0)                                    # a few-step generator's fresh noise
        outputs.append(generate(denoiser, z, sigma_init, steps, renoise, cond).double())
    x, lora, teacher = outputs
    miss = (lora - x).norm()
    return {"relative": float(miss / x.norm()), "missed": float(miss / (teacher - x).norm())}


def lora_card(folder: Path, record: dict, teacher: str, report: dict, measured: dict, pipeline: str) -> str:
    """The LoRA's README: what it is, how it was made, what it measured, the diffusers call."""
    if report.get("exact"):
        how = (f"the LoRA student's adapter itself (rank {report['rank']}, α {report['alpha']:g}): exact, "
               "no approximation")
    else:
        how = (f"the rank-{report['rank']} truncated SVD of the full student's weight differences W − W_teacher in "
               f"{report['layers']} Linear and Conv2d layers: relative Frobenius error {report['svd_error']:.3g} of "
               f"ΔW overall, {report['worst_layer']:.3g} in the worst layer")
        if report["not_carried"]:
            how += (f"; {len(report['not_carried'])} other tensors (biases, norms) also differ and a LoRA cannot "
                    f"carry them ({report['not_carried_share']:.3g} of ‖Δ‖)")
    form = written_form(folder, record)
    lines = ["import torch", "from diffusers import DiffusionPipeline", ""]
    if form is not None:                          # a stock export: its scheduler takes the generator's one step
        scheduler = type(form.scheduler).__name__
        lines[1:1] = [f"from diffusers import {scheduler}"]
    lines += [f'pipe = DiffusionPipeline.from_pretrained("{teacher}")', 'pipe.load_lora_weights("path/to/this/folder")']
    if form is not None:
        lines += [f'pipe.scheduler = {scheduler}.from_pretrained("{folder}", subfolder="scheduler")',
                  f"image = {form.call_text()}.images[0]"]
    use = "```python\n" + "\n".join(lines) + "\n```\n"
    return (f"---\nlibrary_name: diffusers\ntags: [sid, lora, one-step, distillation]\nbase_model: {teacher}\n---\n\n"
            f"# A one-step generator as a LoRA on its teacher\n\nThe generator `{folder}` (distilled by sid from "
            f"the {pipeline} `{teacher}`) as {how}.\n\nMeasured on the noise of seeds 0–{len(SEEDS) - 1}: the LoRA "
            f"generator's samples differ from the export's by {measured['relative']:.3g} (relative), "
            f"{measured['missed']:.3g} of the student's change from the teacher.\n\n{use}")


def export_lora(path, teacher: str | None = None, rank: int | None = None, out=None,
                prompt: str = "a photo of a cat") -> dict:
    """The generator of a run (or an export) as a LoRA on its teacher, in ``out`` (default: ``lora/`` in the
    export): a LoRA student's saved adapter as it is (unless ``rank`` is given), else the rank-``rank`` (default
    64) truncated SVD of the difference. Returns where, the report and what was measured."""
    folder = export_folder(path)
    record = json.loads((folder / "generator.json").read_text())
    spec = record["denoiser"]
    cls, slot = lora_pipeline(spec.get("pipeline"))
    teacher = teacher or ((record.get("config") or {}).get("teacher") or {}).get("diffusers", {}).get("path")
    if not teacher:
        raise SidError(f"{folder} does not name its teacher's folder: give it with --teacher")
    out = Path(out) if out is not None else folder / "lora"
    check_replaceable(out)                                   # before the work, not after it
    teacher_net = network_of(spec["class_name"], teacher, slot)
    adapter = folder / "adapter"
    if rank is None and (adapter / "adapter_config.json").is_file():
        state, config = adapter_lora(adapter)
        report = {"exact": True, "rank": config["r"], "alpha": config["lora_alpha"]}
    else:
        student = network_of(spec["class_name"], str(folder), slot)
        state, config, report = extract_lora(student, teacher_net, rank or 64)
    measured = fidelity(folder, teacher_net, state, config, prompt)
    write_lora(out, cls, slot, state, config, lora_card(folder, record, teacher, report, measured, cls.__name__))
    return {"out": out, "report": report, "measured": measured, "pipeline": cls.__name__, "teacher": teacher}
