"""A Stable Diffusion 1.x or SDXL generator as one checkpoint file (the original layout: the UNet, VAE and text
encoders in one safetensors file), the form ComfyUI, A1111 and diffusers' ``from_single_file`` read.

    sid export-single-file runs/sd                       # runs/sd/sd-generator.safetensors
    sid export-single-file runs/sd/generator-best --out sd-one-step.safetensors

The generator's settings and its one-step call are in the file's metadata and printed.
"""

from __future__ import annotations

from sid.cli import output_path, parser
from sid.teachers.diffusers import export_single_file


def main(argv=None, prog=None) -> int:
    p = parser(__doc__, prog)
    p.add_argument("path", help="a run folder or its export (generator/, generator-ema-<h>/, generator-best/)")
    p.add_argument("--out", default=None, help="the file (default: <run>/<run name>-<export name>.safetensors)")
    args = p.parse_args(argv)
    out = output_path(args.out) if args.out else None
    written, how = export_single_file(args.path, out)
    print(f"single-file checkpoint in {written}; in {how}")
    return 0
