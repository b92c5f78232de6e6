"""Sample an exported one-step generator, or a teacher (EDM Heun sampler) for reference.

    sid sample runs/toy_2d/generator --seeds 0-63 --out grid.png
    sid sample runs/x/generator --seeds 0-9999 --out samples.npz --classes 3
    sid sample runs/x --seeds 0-99 --out pngs/                     # a run folder: its export; one PNG per seed
    sid sample --teacher runs/x/config.yaml --steps 18 --seeds 0-63 --out teacher.png
    sid sample --teacher builtin:fmnist --out teacher.png          # or a preset, or a diffusers folder
    sid sample --teacher sd-folder --prompt "a photo of a cat" --guidance 7.5 --steps 25 --out cats.png
    sid sample runs/sd/generator --prompt "a photo of a cat" --seeds 0-3 --out cats.png   # one step
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sid.cli import output_path, parser, writing
from sid.config import load_config
from sid.errors import SidError
from sid.generator import load_generator
from sid.images import save_image_grid, save_samples, to_uint8
from sid.metrics import text_sampler
from sid.prompt_sources import read_prompts as prompts_of
from sid.sampling import sample_teacher
from sid.teachers import Teacher, build_teacher, teacher_from_path


def parse_ints(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (EDM's --seeds syntax)."""
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            if hi and int(hi) < int(lo):
                raise argparse.ArgumentTypeError(f"{part}: a range runs upwards, e.g. {hi}-{lo}")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers and ranges such as 0-63 or 1,5,9, got {text!r}") from None
    if len(out) > 10**7 or any(not 0 <= s < 2**63 for s in out):
        raise argparse.ArgumentTypeError("seeds are integers in [0, 2^63), at most 10^7 of them")
    return out


def main(argv=None, prog=None) -> int:
    p = parser(__doc__, prog)
    p.add_argument("generator", nargs="?", help="a run folder, its generator/ folder, or generator.safetensors")
    p.add_argument("--teacher", metavar="CONFIG",
                   help="sample a teacher instead (Heun/Euler): a config's (a file or a preset name), a diffusers "
                        "folder, or builtin:<name>")
    p.add_argument("--steps", type=int, default=None,
                   help="teacher: noise levels (Heun: 2 * steps - 1 evaluations; default 18); generator: its steps on "
                        "their own schedule (default: the generator's own, 1 for one-step generators)")
    p.add_argument("--solver", choices=("heun", "euler"), default="heun")
    p.add_argument("--seeds", default="0-63", type=parse_ints, help="one sample per seed, e.g. 0-63 or 1,5,9")
    p.add_argument("--classes", default=None, type=parse_ints,
                   help="class per seed (one value for all, or one per seed)")
    p.add_argument("--out", required=True, help="*.png: grid; *.npz: uint8 images (or raw samples); folder: PNGs")
    p.add_argument("--trust-code", action="store_true",
                   help="allow foreign code to run: the function or pickle that builds a teacher, or a generator "
                        "distilled from one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256, help="samples per network batch")
    p.add_argument("--prompt", action="append", default=[],
                   help="text-to-image teacher or generator: a prompt (repeatable; seed s gets prompt s mod their "
                        "number)")
    p.add_argument("--prompts-file", help="text-to-image teacher or generator: prompts, one per line")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="teacher: classifier-free guidance scale κ against the null condition (1: none)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr (default: where stderr is a terminal)")
    args = p.parse_args(argv)
    seeds, classes = args.seeds, args.classes
    check_out(Path(args.out))
    if classes is not None and len(classes) == 1:
        classes = classes * len(seeds)
    if classes is not None and len(classes) != len(seeds):
        raise SidError(f"--classes gives {len(classes)} values for {len(seeds)} seeds")
    if (args.generator is None) == (args.teacher is None):
        raise SidError("give either an exported generator or --teacher CONFIG")
    prompts = read_prompts(args.prompt, args.prompts_file)
    if args.teacher:
        teacher, steps = load_teacher(args.teacher, args.device, args.trust_code), args.steps or 18
        if teacher.text_to_image and not prompts:
            raise SidError(f"{args.teacher} is a text-to-image teacher: give --prompt or --prompts-file")
        if prompts and not teacher.text_to_image:
            raise SidError("--prompt given, but this teacher takes no text")
        if args.guidance != 1 and teacher.null_condition(1) is None:
            raise SidError(f"--guidance {args.guidance:g}: this teacher has no null condition to guide against")
        guide = {"guidance": args.guidance, "guide": teacher.guide, "sigmas": teacher.sampling_sigmas(steps)}

        def draw(seeds, classes):
            if not prompts:                                  # decoded through a latent teacher's VAE
                return teacher.decode(sample_teacher(teacher.denoiser, teacher.shape, steps, args.solver, seeds,
                                                     classes, args.device, **guide)).cpu()
            cond = teacher.encode([prompts[seed % len(prompts)] for seed in seeds])    # a seed's own prompt
            latents = sample_teacher(teacher.denoiser, teacher.shape, steps, args.solver, seeds, None,
                                     args.device, cond=cond, **guide)
            return teacher.decode(latents).cpu()
    else:
        generator = load_generator(args.generator, device=args.device, trust_code=args.trust_code)
        from sid.teachers.diffusers import export_codec, stock_call  # diffusers loads for generators only

        codec = export_codec(args.generator, args.trust_code)  # a latent generator's VAE (and text encoder)
        if call := stock_call(args.generator):
            print(call)
        text = codec is not None and codec.text_to_image
        if prompts and not text:
            raise SidError("--prompt given, but this generator takes no text (its teacher was not text-to-image)")
        if text and not prompts:
            raise SidError(f"{args.generator} is a text-to-image generator: give --prompt or --prompts-file")
        if classes is not None and not generator.label_dim:
            raise SidError("--classes given, but this generator is unconditional")
        codec = codec.to(args.device) if codec is not None else None
        sample_text = text_sampler(generator, codec, args.device, args.steps) if text else None

        def draw(seeds, classes):
            if text:                                         # a seed's own prompt
                return sample_text(seeds, [prompts[seed % len(prompts)] for seed in seeds]).cpu()
            x = generator.sample_seeds(seeds, classes, device=args.device, steps=args.steps)
            return (x if codec is None else codec.decode(x)).cpu()
    x = in_batches(draw, seeds, classes, args.batch, args.progress)
    with writing(args.out):
        write(x, Path(args.out), seeds)
    print(f"wrote {len(seeds)} samples to {args.out}")
    return 0


def read_prompts(prompts: list[str], path: str | None) -> list[str]:
    """--prompt values, then those of --prompts-file (one per line, or .jsonl)."""
    return list(prompts) + (list(prompts_of(path)) if path else [])


def in_batches(draw, seeds: list[int], classes: list[int] | None, batch: int, progress: bool | None) -> torch.Tensor:
    """``draw(seeds, classes)`` over batches of seeds, with a progress bar (samples, rate, ETA) on stderr
    (``None``: where stderr is a terminal)."""
    if batch < 1:
        raise SidError(f"--batch {batch}: give a positive number of samples per batch")
    chunks = []
    with tqdm(total=len(seeds), desc="sampling", unit="img", unit_scale=True, dynamic_ncols=True,
              disable=None if progress is None else not progress) as bar:
        for i in range(0, len(seeds), batch):
            chunks.append(draw(seeds[i:i + batch], None if classes is None else classes[i:i + batch]))
            bar.update(len(chunks[-1]))
    return torch.cat(chunks)


def load_teacher(teacher: str, device, trust_code: bool = False) -> Teacher:
    """The teacher (its denoiser on ``device``) of a distillation config (a file or a preset), or one given by its
    path alone: a diffusers folder or ``builtin:<name>``. ``trust_code``: from the command line only."""
    overrides = teacher_from_path(teacher)
    cfg = load_config([], overrides) if overrides else load_config([teacher])
    return build_teacher(cfg.teacher, trust_code=trust_code).to(device)


def check_out(out: Path) -> None:
    if out.suffix not in ("", ".png", ".npz") and not out.is_dir():
        raise SidError(f"--out {out}: give a .png (a grid), an .npz, or a folder (one PNG per seed)")
    output_path(out, folder=out.suffix == "")


def write(x: torch.Tensor, out: Path, seeds) -> None:
    images = x.ndim == 4 and x.shape[1] in (1, 3)
    if out.suffix == ".npz":
        np.savez(out, images=to_uint8(x), seeds=np.array(seeds)) if images else np.savez(out, samples=x.numpy())
    elif out.suffix == ".png":
        if not save_samples(x, out):
            raise SidError(f"samples of shape {tuple(x.shape[1:])} cannot be drawn; write an .npz instead")
    else:
        if not images:
            raise SidError("a folder of PNGs needs image samples; write an .npz instead")
        out.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(seeds, x):
            save_image_grid(image[None], out / f"{seed:06d}.png", cols=1)
