"""A distilled generator as a LoRA on its teacher, which stock diffusers loads with ``pipe.load_lora_weights``.

    sid export-lora runs/sd                         # a LoRA student: its adapter exactly (rank and α as trained)
    sid export-lora runs/sd --rank 64               # a full student: the rank-64 truncated SVD of W − W_teacher
    sid export-lora runs/sd/generator --teacher path/to/teacher --out sd-lora/

The LoRA is written as diffusers' ``save_lora_weights`` writes it (``pytorch_lora_weights.safetensors``, α in its
metadata), with a card that gives the diffusers call. Its fidelity is measured and printed: the SVD's relative
error on ΔW, and the LoRA generator's samples against the export's for a few noise draws.
"""

from __future__ import annotations

from sid.cli import output_path, parser
from sid.teachers.diffusers import LORA_FILE, export_lora


def main(argv=None, prog=None) -> int:
    p = parser(__doc__, prog)
    p.add_argument("path", help="a run folder or its export (generator/, generator-ema-<h>/, generator-best/)")
    p.add_argument("--rank", type=int, default=None,
                   help="the LoRA's rank: a full student's SVD (default 64); given for a LoRA student, its merged "
                        "weights are decomposed at that rank instead of its adapter being written as is")
    p.add_argument("--teacher", default=None, help="the teacher's folder or hub id (default: the run's)")
    p.add_argument("--out", default=None, help="the LoRA's folder (default: lora/ in the export)")
    p.add_argument("--prompt", default="a photo of a cat",
                   help="a text-to-image generator's prompt for the measurement")
    args = p.parse_args(argv)
    out = output_path(args.out, folder=True) if args.out else None
    done = export_lora(args.path, args.teacher, args.rank, out, args.prompt)
    report, measured = done["report"], done["measured"]
    error = "exact" if report.get("exact") else f"SVD error {report['svd_error']:.3g} of ΔW"
    print(f"LoRA of rank {report['rank']} ({error}) in {done['out'] / LORA_FILE}; its samples differ from the "
          f"generator's by {measured['relative']:.3g} (relative). In diffusers: pipe.load_lora_weights("
          f"{str(done['out'])!r}) on the teacher's {done['pipeline']} ({done['teacher']}); the whole call is in "
          f"{done['out'] / 'README.md'}")
    return 0
