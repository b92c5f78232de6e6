"""λ sweeps: one command runs a grid of runs, another writes the report.

    sid sweep run --config toy_2d --out runs/sweep loss.lam=0.5,1.0,1.2 train.seed=0,1
    sid sweep run --config toy_2d --out runs/sweep loss.lam=0.5,1.0,1.2 --dry-run
    sid sweep report runs/sweep                   # report.md, quality.png, losses.png, samples.png
    sid sweep report runs/sweep --baseline "teacher, Heun 35 NFE=31.25"    # plus a reference line

Values separated by commas form the grid (commas inside [...] do not split); every other override applies
to all runs. Re-running the same command skips finished runs and resumes unfinished ones. With several
GPUs visible, one run per GPU runs at a time.
"""

import argparse
import sys

from sid.cli import parser
from sid.errors import SidError


def parse_baselines(items: list[str]) -> dict[str, float]:
    """``NAME=VALUE`` pairs (split at the last '='; names may hold spaces and commas)."""
    baselines = {}
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            baselines[name.strip()] = float(value)
        except ValueError:
            raise SidError(f"--baseline {item!r}: expected NAME=VALUE with a number, e.g. 'teacher=31.25'") from None
        if not name.strip():
            raise SidError(f"--baseline {item!r}: the name before '=' is missing")
    return baselines


def main(argv=None, prog=None) -> int:
    p = parser(__doc__, prog)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) every grid point")
    run.add_argument("--out", required=True, help="sweep folder")
    run.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    run.add_argument("--devices", type=int, default=None, help="parallel runs (default: the visible GPUs)")
    one = sub.add_parser("one", help=argparse.SUPPRESS)       # one grid point in its own process (per GPU)
    for command in (run, one):
        command.add_argument("--config", action="append", default=[], help="YAML file or shipped preset name")
        command.add_argument("--trust-code", action="store_true",
                             help="let the teacher run foreign code (an EDM pickle, a teacher.python.factory)")
        command.add_argument("overrides", nargs="*", help="dotted overrides; comma-separated values form the grid")
    report = sub.add_parser("report", help="write report.md and figures for a sweep folder")
    report.add_argument("sweep_dir")
    report.add_argument("--rise", type=float, default=2.0, help="diverged if the metric ends above rise × its best")
    report.add_argument("--baseline", action="append", default=[], metavar="NAME=VALUE",
                        help="a reference value drawn as a horizontal line and listed, e.g. 'teacher, 35 NFE=31.25'")
    report.add_argument("--trust-code", action="store_true",
                        help="allow teacher.kind=python runs' generators to run the function building them")
    args, extra = p.parse_known_args(argv)                   # overrides after a flag too (not intermixed: a
    options = [a for a in extra if a.startswith("-")]        # subcommand's parser cannot be)
    if options or (extra and "overrides" not in vars(args)):
        p.error(f"unrecognized arguments: {' '.join(options or extra)}")
    if extra:
        args.overrides += extra
    from sid.sweep import plan, run_one, run_sweep, single_run

    try:
        if args.command == "report":
            from sid.report import write_report

            baselines = parse_baselines(args.baseline)
            print(f"wrote {write_report(args.sweep_dir, args.rise, baselines=baselines, trust_code=args.trust_code)}")
        elif args.command == "one":
            run_one(single_run(args.config, args.overrides), args.trust_code)
        else:
            runs = plan(args.config, args.overrides, args.out)
            for r in runs:
                print(f"{r['state']:>8}  {r['dir']}  {' '.join(r['overrides'][:-1])}")
                if r["state"] == "broken":
                    print(f"skipping {r['dir']}: its status.json is unreadable (delete it to run the point again)",
                          file=sys.stderr)
            if not args.dry_run:
                import torch

                devices = args.devices if args.devices is not None else torch.cuda.device_count()
                run_sweep(runs, args.config, devices, args.trust_code)
    except KeyboardInterrupt as e:       # the runs checkpointed their last step: the same command resumes
        print(f"{e or 'interrupted'}: the same `sid sweep run` command resumes the sweep", file=sys.stderr)
        return 130
    return 0
