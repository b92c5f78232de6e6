"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: trains a few steps, then
writes each rank's generator weights and the process count to <out>/rank<r>.safetensors."""

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sid.config import load_config  # noqa: E402
from sid.trainer import train  # noqa: E402

out = Path(sys.argv[1])
run = train(load_config([], sys.argv[2:]))
rank = run.accelerator.process_index
state = {k: v.contiguous() for k, v in run.generator.state_dict().items()}
save_file(state, out / f"rank{rank}.safetensors", metadata={"world": str(run.accelerator.num_processes)})
