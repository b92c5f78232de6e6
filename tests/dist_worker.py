"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: trains a few steps, then
writes each rank's generator weights and the process count to <out>/rank<r>.safetensors.

With SIGNAL_RANK1_AT=<nimg> in the environment, rank 1 alone sends itself SIGTERM after that many images and
each rank writes the message it stopped with to <out>/rank<r>.interrupted; with RESUME=1 the run resumes."""

import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sid.trainer  # noqa: E402
from sid.config import load_config  # noqa: E402
from sid.trainer import TrainingInterrupted, train  # noqa: E402

out = Path(sys.argv[1])
signal_at = int(os.environ.get("SIGNAL_RANK1_AT", 0))
real_iteration = sid.trainer.iteration


def signalled(run):
    result = real_iteration(run)
    if run.accelerator.process_index == 1 and run.nimg == signal_at:
        signal.raise_signal(signal.SIGTERM)
    return result


sid.trainer.iteration = signalled
try:
    run = train(load_config([], sys.argv[2:]), resume="auto" if os.environ.get("RESUME") else None)
except TrainingInterrupted as e:
    (out / f"rank{os.environ['RANK']}.interrupted").write_text(str(e))
    sys.exit(0)
rank = run.accelerator.process_index
state = {k: v.contiguous() for k, v in run.generator.state_dict().items()}
save_file(state, out / f"rank{rank}.safetensors", metadata={"world": str(run.accelerator.num_processes)})
