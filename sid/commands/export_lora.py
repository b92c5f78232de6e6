"""A distilled generator as a LoRA on its teacher, which stock diffusers loads with ``pipe.load_lora_weights``.

    sid export-lora runs/sd                         # a LoRA student: its adapter exactly (rank and α as trained)
    sid export-lora runs/sd --rank 64               # a full student: the rank-64 truncated SVD of W − W_teacher
    sid export-lora runs/sd/generator --teacher path/to/teacher --out sd-lora/

The LoRA is written as diffusers' ``save_lora_weights`` writes it (``pytorch_lora_weights.safetensors``, α in its
metadata), with a card that gives the diffusers call. Its fidelity is measured and printed: the SVD's relative
error on ΔW, and the LoRA generator's samples against the export's for a few seeds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from sid.cli import output_path, parser
from sid.errors import SidError
from sid.generator import load_generator
from sid.teachers.diffusers import export_codec
from sid.teachers.diffusers.exchange import LORA_FILE, adapter_lora, apply_lora, extract_lora, lora_pipeline, write_lora
from sid.teachers.diffusers.export import written_form
from sid.teachers.diffusers.models import model_of

SEEDS = range(4)
PROMPT = "a photo of a cat"


def export_folder(path: Path) -> Path:
    """The export folder of a run folder or of the export itself."""
    for folder in (path, path / "generator"):
        if (folder / "generator.json").is_file():
            return folder
    raise SidError(f"{path} is neither a run folder nor an export (no generator.json); give the run's folder")


def network(cls_name: str, folder: str, slot: str):
    """The diffusers network of a pipeline folder (or hub id), in float32."""
    import diffusers

    try:
        return getattr(diffusers, cls_name).from_pretrained(folder, subfolder=slot, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SidError(f"the teacher's {slot} cannot be loaded from {folder} ({type(e).__name__}); the LoRA is a "
                       "difference to the teacher: give its folder with --teacher") from None


@torch.no_grad()
def fidelity(folder: Path, teacher_net, state: dict, config: dict, prompt: str) -> dict:
    """The LoRA generator (the teacher's network with the LoRA merged) against the export, on ``SEEDS``: the
    relative error ‖x_LoRA − x‖ / ‖x‖, and the share of the student's change from the teacher it misses,
    ‖x_LoRA − x‖ / ‖x_teacher − x‖."""
    generator = load_generator(folder)
    codec = export_codec(folder)
    cond = codec.encode([prompt] * len(SEEDS)) if codec is not None and codec.text_to_image else None
    outputs = []
    for weights in (None, apply_lora(copy.deepcopy(teacher_net), state, config), teacher_net):
        g = generator
        if weights is not None:
            g = copy.deepcopy(generator)
            model_of(g.denoiser).load_state_dict(weights.state_dict())
        outputs.append(g.sample_seeds(SEEDS, cond=cond).double())
    x, lora, teacher = outputs
    miss = (lora - x).norm()
    return {"relative": float(miss / x.norm()), "missed": float(miss / (teacher - x).norm())}


def card(folder: Path, record: dict, teacher: str, report: dict, measured: dict, pipeline: str) -> str:
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
    use = "```python\n" + "\n".join(lines) + "\n"
    use += "```\n"
    return (f"---\nlibrary_name: diffusers\ntags: [sid, lora, one-step, distillation]\nbase_model: {teacher}\n---\n\n"
            f"# A one-step generator as a LoRA on its teacher\n\nThe generator `{folder}` (distilled by sid from "
            f"the {pipeline} `{teacher}`) as {how}.\n\nMeasured on seeds 0–{len(SEEDS) - 1}: the LoRA generator's "
            f"samples differ from the export's by {measured['relative']:.3g} (relative), {measured['missed']:.3g} of "
            f"the student's change from the teacher.\n\n{use}")


def main(argv=None, prog=None) -> int:
    p = parser(__doc__, prog)
    p.add_argument("path", help="a run folder or its export (generator/, generator-ema-<h>/, generator-best/)")
    p.add_argument("--rank", type=int, default=None,
                   help="the LoRA's rank: a full student's SVD (default 64); given for a LoRA student, its merged "
                        "weights are decomposed at that rank instead of its adapter being written as is")
    p.add_argument("--teacher", default=None, help="the teacher's folder or hub id (default: the run's)")
    p.add_argument("--out", default=None, help="the LoRA's folder (default: lora/ in the export)")
    p.add_argument("--prompt", default=PROMPT, help="a text-to-image generator's prompt for the measurement")
    args = p.parse_args(argv)
    folder = export_folder(Path(args.path))
    record = json.loads((folder / "generator.json").read_text())
    spec = record["denoiser"]
    cls, slot = lora_pipeline(spec.get("pipeline"))
    teacher = args.teacher or ((record.get("config") or {}).get("teacher") or {}).get("diffusers", {}).get("path")
    if not teacher:
        raise SidError(f"{folder} does not name its teacher's folder: give it with --teacher")
    out = output_path(args.out or folder / "lora", folder=True)
    teacher_net = network(spec["class_name"], teacher, slot)
    adapter = folder / "adapter"
    if args.rank is None and (adapter / "adapter_config.json").is_file():
        state, config = adapter_lora(adapter)
        report = {"exact": True, "rank": config["r"], "alpha": config["lora_alpha"]}
    else:
        student = network(spec["class_name"], str(folder), slot)
        state, config, report = extract_lora(student, teacher_net, args.rank or 64)
    measured = fidelity(folder, teacher_net, state, config, args.prompt)
    write_lora(out, cls, slot, state, config, card(folder, record, teacher, report, measured, cls.__name__))
    error = "exact" if report.get("exact") else f"SVD error {report['svd_error']:.3g} of ΔW"
    print(f"LoRA of rank {report['rank']} ({error}) in {out / LORA_FILE}; its samples differ from the generator's "
          f"by {measured['relative']:.3g} (relative). In diffusers: pipe.load_lora_weights({str(out)!r}) on "
          f"{cls.__name__}.from_pretrained({teacher!r})")
    return 0
