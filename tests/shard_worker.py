"""Run by tests/test_sharding.py under `accelerate launch --num_processes 2` (gloo, CPU), the distillation config in
argv: the same run unsharded (DDP) straight to its end in <out>/ddp, and sharded (FSDP2: the launcher's
ACCELERATE_USE_FSDP, set here for the second) stopped halfway and resumed in <out>/fsdp; the same with LoRA students
in <out>/ddp-lora and <out>/fsdp-lora. Then, on a sharded run's
generator step, where gradients go: <out>/grads<rank>.json; and a sharded run's measured memory beside its plan:
<out>/memory<rank>.json."""

import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accelerate import Accelerator  # noqa: E402

from sid.config import load_config  # noqa: E402
from sid.run import build, set_training  # noqa: E402
from sid.sharding import full_state  # noqa: E402
from sid.trainer import generator_micro_loss, train  # noqa: E402

out, overrides = Path(sys.argv[1]), sys.argv[2:]
end_training = Accelerator.end_training
Accelerator.end_training = lambda self: None      # one process group for the several runs here, closed at the end


# LoRA students, with an Adam eps that keeps gradients at rounding level (B starts at 0, so A's are) from being
# normalised into whole steps, which would carry the two runs' summation orders into the weights
LORA = ["lora.fake_score=true", "lora.generator=true", "lora.rank=4", "optim.eps=1e-3"]


def config(run_dir, total, *extra):
    return load_config([], [*overrides, f"train.run_dir={out / run_dir}", f"train.total_nimg={total}", *extra])


ddp = train(config("ddp", 8))
train(config("ddp-lora", 8, *LORA))
os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
train(config("fsdp", 4))
fsdp = train(config("fsdp", 8), resume="auto")
train(config("fsdp-lora", 4, *LORA))
assert train(config("fsdp-lora", 8, *LORA), resume="auto").sharded
rank = fsdp.accelerator.process_index
assert fsdp.sharded and not ddp.sharded

run = build(config("grads", 8), Accelerator(), resume=None)
set_training(run.fake_score, False, run.shared)
run.generator.train()


class NoInputGrad(torch.nn.Module):        # the same predictions, with their input-gradient cut
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma, cond=None):
        return self.net(x.detach(), sigma, cond)


def generator_grads(**replace):
    """The generator's gradient, gathered, after one micro-batch of its loss (the same draws every time)."""
    for p in run.generator.parameters():
        p.grad = None
    saved = {name: getattr(run, name) for name in replace}
    if "teacher" in replace:
        saved["teacher"] = run.teacher.denoiser
        run.teacher.denoiser = replace["teacher"]
    if "fake_score" in replace:
        run.fake_score = replace["fake_score"]
    torch.manual_seed(7)
    partial(generator_micro_loss, run, None)(0)[0].sum().backward()
    run.fake_score = saved.get("fake_score", run.fake_score)
    if "teacher" in saved:
        run.teacher.denoiser = saved["teacher"]
    return torch.cat([full_state({"g": p.grad}, keep=True)["g"].flatten() for p in run.generator.parameters()])


whole = generator_grads()
untouched = all(p.grad is None for p in (*run.teacher.denoiser.parameters(), *run.fake_score.parameters()))
cut_fake = generator_grads(fake_score=NoInputGrad(run.fake_score))
cut_teacher = generator_grads(teacher=NoInputGrad(run.teacher.denoiser))
(out / f"grads{rank}.json").write_text(json.dumps({
    "sharded": run.sharded, "untouched": untouched, "norm": float(whole.norm()),
    "fake_takes_part": not torch.allclose(whole, cut_fake),
    "teacher_takes_part": not torch.allclose(whole, cut_teacher),
    "repeatable": bool(torch.equal(whole, generator_grads()))}))

# The memory plan of a sharded run against its measured peak (eval/bench_memory.py's smoke configuration).
from eval.bench_memory import SMOKE, measure, planned  # noqa: E402

smoke = load_config([], [*SMOKE, "train.precision=fp32", f"train.run_dir={out / 'memory'}"])
(out / f"memory{rank}.json").write_text(json.dumps({"measured": measure(smoke), "planned": planned(smoke)}))
end_training(run.accelerator)
