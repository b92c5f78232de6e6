import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# CI's two threads (OMP_NUM_THREADS, where it is set, says how many: the suite must pass with 1 and with 2).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or min(2, os.cpu_count() or 1))

from edm_pickles import edm_side  # noqa: E402, F401  (a fixture: EDM's modules while a test writes pickles)


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 128) -> None:
    """Two float32 computations of the same values whose sums run in another order (another batch composition, another
    CPU's vector width or GEMM blocking): equal within ``ulps`` float32 epsilons of the values' scale, their largest
    magnitude. Reordering a sum of n terms moves it by about √n ε of the terms' scale; these tiny networks reduce over
    at most a few hundred terms (√n ≈ 16) through a few layers, which 2^7 ε covers on any CPU, while a real difference
    (a wrong condition, coefficient or scale) is 1e-3 of the scale or more."""
    scale = float(torch.maximum(actual.detach().abs().max(), expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=ulps * torch.finfo(torch.float32).eps * scale)


def assert_resumed_exactly(whole, resumed) -> None:
    """A run stopped and resumed ends bit-identical to an uninterrupted one: generator, fake score and EMA."""
    for a, b in ((whole.generator, resumed.generator), (whole.fake_score, resumed.fake_score),
                 (whole.ema.model, resumed.ema.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_trained(run) -> None:
    """Training moved the generator away from the teacher it started as."""
    start = run.teacher.denoiser.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in run.generator.denoiser.state_dict().items())


def _fused_bf16_attention() -> bool:
    q = torch.zeros(2, 2, 64, 8, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


# torch's fused bf16 attention on the CPU packs its operands for AVX-512 where the hardware has it, and refuses
# ("pack_vnni2 is only supported when avx512 is supported") where ATEN_CPU_CAPABILITY holds the kernels below the
# hardware's: a limit of that setting, not of a CPU.
FUSED_BF16_ATTENTION = _fused_bf16_attention()


def bf16_attention():
    """Where bf16 attention runs here: torch's fused kernel, or its unfused one where the fused one refuses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return contextlib.nullcontext() if FUSED_BF16_ATTENTION else sdpa_kernel([SDPBackend.MATH])


def sid_process(*args, cwd=ROOT, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m sid ARGS`` (the ``sid`` command) in a child process, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "sid", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, **kwargs)

# A diffusers UNet2DModel small enough for CPU tests (built from config: no download).
TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [16, 32], "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """``tiny_pipeline(name)``: the folder of a tiny latent pipeline of that family (``tiny_pipelines.BUILDERS``),
    built from configs once per session and saved as a user's pipeline folder is."""
    from tiny_pipelines import BUILDERS

    made = {}

    def folder(name: str) -> Path:
        if name not in made:
            made[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return made[name]

    return folder


@pytest.fixture
def tiny_unet_overrides(tmp_path):
    """Dotted overrides for a short training run on a random tiny diffusers teacher."""
    import json

    return [
        "teacher.kind=diffusers", f"teacher.diffusers.unet_config={json.dumps(TINY_UNET).replace(' ', '')}",
        "teacher.diffusers.prediction_type=edm", "optim.batch=8", "train.total_nimg=32",
        "train.log_every_nimg=16", "train.sample_every_nimg=32", "train.ckpt_every_nimg=16",
        f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.num_samples=4",
    ]
