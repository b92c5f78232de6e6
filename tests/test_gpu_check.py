"""eval/gpu_check.py --smoke: both GPU commands run their code paths on the CPU with tiny sizes, so that the GPU
run, when a GPU is at hand, cannot fail on an import, a path or a typo."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from eval.gpu_check import main

pytestmark = pytest.mark.slow


class Features(nn.Module):
    def forward(self, x):
        return torch.cat([x.float().mean(dim=(2, 3)), x.float().std(dim=(2, 3))], dim=1)


def test_the_speed_command_smoke(tmp_path):
    assert main(["speed", "--out", str(tmp_path), "--smoke", "--iters", "1", "--budget", "300"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["mode"] for r in result["rows"]] == ["reference", "bf16", "reuse"]
    assert all(r["finite"] and r["img_per_s"] > 0 for r in result["rows"]) and result["fast_over_reference"] > 0
    assert "fast / reference" in (tmp_path / "bench.md").read_text()
    assert "passed" in result["gpu_tests"] or "skipped" in result["gpu_tests"]      # the GPU tests' summary


def test_the_quality_command_smoke_and_its_budget(tmp_path):
    extractor = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(Features()), str(extractor))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", images=rng.integers(0, 255, (16, 32, 32, 1), dtype=np.uint8))
    common = ["quality", "--smoke", "--weights", str(extractor), "--ref-source", str(tmp_path / "ref.npz"),
              "--num", "8", "--every-nimg", "8", "--seconds", "1"]
    members = ["--members", "sid,fgm,dmd,sim,sida", "--real", str(tmp_path / "ref.npz")]    # command C's
    assert main([*common, *members, "--out", str(tmp_path / "q"), "--budget", "300"]) == 0
    result = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert list(result["runs"]) == ["sid", "fgm", "dmd", "sim", "sida"] and np.isfinite(result["teacher_fid"])
    assert all(len(run["final_fid"]) == 2 and run["curve"] for run in result["runs"].values())
    assert (tmp_path / "q" / "quality.png").stat().st_size > 1000
    # a budget too short for the runs: the teacher's FID is measured, the runs are skipped with a line
    assert main([*common, "--out", str(tmp_path / "short"), "--budget", "20"]) == 0
    short = json.loads((tmp_path / "short" / "quality.json").read_text())
    assert all("would not fit" in run["skipped"] for run in short["runs"].values())
