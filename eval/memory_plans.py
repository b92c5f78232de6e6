"""The memory plans of the big teachers, from their published architectures as sid ships them
(``sid/assets/architectures/``, read by ``sid/teachers/diffusers/published.py``): Stable Diffusion 1.5, SDXL base,
SD3 medium, SD3.5 large and FLUX.1-dev, each with the settings of its preset (SDXL: SiD-LSG's, the sd15_lsg preset, in
bf16 with activation checkpointing at its 1024 px; SD3.5 large: SiD-DiT's, the sd3_medium_dit preset): full students
on one GPU and sharded over a node of eight, and LoRA students on one GPU (their rows hold the adapters where the
full students' hold the weights; a row without the VAE and text encoders keeps them on the CPU between uses).

    python -m eval.memory_plans --out runs/memory_plans

No weights are needed or read, and nothing is downloaded: the plan (sid/memory.py) builds the networks on the meta
device from the shipped configs. Writes plans.md to --out and prints it.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

LORA = ["lora.fake_score=true", "lora.generator=true"]
FULL = [("full students, 1 GPU", [], 1, False), ("full students, 8 GPUs, sharded", [], 8, True),
        ("LoRA students (rank 64), 1 GPU", LORA, 1, False)]
OFFLOADED = ["perf.offload_codec=true"]

PIPELINES = {
    "Stable Diffusion 1.5": ("sd15_lsg", [], FULL),
    "Stable Diffusion XL base": ("sd15_lsg", ["teacher.diffusers.path=stabilityai/stable-diffusion-xl-base-1.0",
                                              "train.precision=auto", "perf.grad_checkpointing=true"], FULL),
    "Stable Diffusion 3 medium": ("sd3_medium_dit", [], FULL),
    "Stable Diffusion 3.5 large": ("sd3_medium_dit", ["teacher.diffusers.path=stabilityai/stable-diffusion-3.5-large"],
                                   [*FULL, ("LoRA students (rank 64), 1 GPU, codec offloaded", LORA + OFFLOADED, 1,
                                            False)]),
    "FLUX.1-dev at 512 px": ("flux_dev_sid_dit", [], [
        ("full students, 8 GPUs, sharded", [], 8, True),
        ("LoRA students (rank 64), 1 GPU", LORA, 1, False),
        ("LoRA students (rank 64), 1 GPU, codec offloaded", LORA + OFFLOADED, 1, False),
        ("LoRA students (rank 64), 1 GPU, codec offloaded, micro-batch 1", LORA + OFFLOADED + ["optim.batch_gpu=1"],
         1, False)]),
    "FLUX.1-dev at 1024 px": ("flux_dev_sid_dit", ["teacher.diffusers.resolution=1024"], [
        ("full students, 8 GPUs, sharded", [], 8, True),
        ("LoRA students (rank 64), 1 GPU, codec offloaded", LORA + OFFLOADED, 1, False),
        ("LoRA students (rank 64), 1 GPU, codec offloaded, micro-batch 1", LORA + OFFLOADED + ["optim.batch_gpu=1"],
         1, False)]),
}


def plans(out: Path) -> str:
    from sid.config import load_config
    from sid.memory import gib, plan

    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, (preset, overrides, rows) in PIPELINES.items():
            lines = [f"### {title}", ""]
            header = None
            for label, extra, processes, sharded in rows:
                cfg = load_config([preset], [*overrides, *extra, f"train.run_dir={tmp}/run"])
                result = plan(cfg, processes, sharded)
                cells = {what.replace("adapters", "weights"): size for what, size in result.rows}   # LoRA: theirs
                if header is None:
                    header = list(cells)
                    lines.append(f"`--config {preset}`" + (f" with {' '.join(overrides)}" if overrides else "")
                                 + f", micro-batch {result.batch_gpu}; {result.notes[0]}; {result.notes[1]}.")
                    lines += ["", "| | " + " | ".join(header) + " | total |", "|---" * (len(header) + 2) + "|"]
                lines.append(f"| {label} | " + " | ".join(gib(cells[what]) if what in cells else "—" for what in header)
                             + f" | **{gib(result.total)}** |")
            sections.append("\n".join(lines))
    text = "\n\n".join(sections)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.md").write_text(text + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.memory_plans", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/memory_plans")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(plans(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
