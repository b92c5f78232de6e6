"""teacher.kind=python: the user's own network, built by their function, distilled and exported; the export
loads only with trust_code, since loading runs that function."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sid.config import load_config
from sid.errors import SidError
from sid.generator import load_generator
from sid.teachers import build_teacher
from sid.trainer import train
from tests.custom_teacher import build

FACTORY = "tests.custom_teacher:build"


def python_teacher(factory=FACTORY, shape="[1,8,8]", **kwargs):
    return ["teacher.kind=python", f"teacher.python.factory={factory}", f"teacher.python.shape={shape}",
            f"teacher.python.kwargs={json.dumps(kwargs).replace(' ', '')}"]


@pytest.fixture
def pretrained(tmp_path):
    """A 'pretrained' class-conditional network: random weights saved where the factory reads them."""
    torch.manual_seed(3)
    weights = tmp_path / "pretrained.safetensors"
    save_file(build(label_dim=3).state_dict(), weights)
    return weights


@pytest.mark.slow
def test_the_users_network_is_distilled_exported_and_loads_when_trusted(pretrained, tmp_path):
    kwargs = {"label_dim": 3, "weights": str(pretrained)}
    teacher = build_teacher(load_config([], python_teacher(**kwargs)).teacher, trust_code=True)
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 0.7), torch.eye(3)[[0, 1, 2, 0]]
    torch.testing.assert_close(teacher.denoiser(x, sigma, labels), build(**kwargs)(x, sigma, labels))
    assert teacher.shape == (1, 8, 8) and teacher.label_dim == 3

    run_dir = tmp_path / "run"
    run = train(load_config([], python_teacher(**kwargs) + [
        "optim.batch=8", "train.total_nimg=32", "train.log_every_nimg=16", "train.ckpt_every_nimg=32",
        "train.sample_every_nimg=32", "train.num_samples=4", f"train.run_dir={run_dir}", "train.progress=false",
        "train.tracker=none"]), trust_code=True)
    assert (run_dir / "samples" / "compare.png").is_file()
    with pytest.raises(SidError, match=r"tests.custom_teacher:build .*trust_code=True"):
        load_generator(run_dir / "generator")
    generator = load_generator(run_dir / "generator", trust_code=True)
    torch.testing.assert_close(generator.sample_seeds(range(3), classes=[0, 1, 2]),
                               run.ema.model.sample_seeds(range(3), classes=[0, 1, 2]))

    from sid.cli import main as sid
    from sid.report import write_report

    out = tmp_path / "s.npz"
    assert sid(["sample", str(run_dir / "generator"), "--seeds", "0-3", "--out", str(out)]) == 2
    assert sid(["sample", str(run_dir / "generator"), "--seeds", "0-3", "--out", str(out), "--trust-code"]) == 0
    assert out.is_file()
    with pytest.raises(SidError, match="trust_code=True"):                  # a sweep report draws its samples
        write_report(tmp_path, num_samples=4)
    assert write_report(tmp_path, num_samples=4, trust_code=True).is_file()


@pytest.mark.parametrize("factory, message", [
    ("tests.custom_teacher", "expected 'package.module:function'"),
    ("no_such_package.nets:build", "no module named 'no_such_package'"),
    ("tests.custom_teacher:missing", "has no function 'missing'"),
    ("tests.custom_teacher:not_a_network", "returned a str, not a torch.nn.Module"),
    ("tests.custom_teacher:without_contract", "lacks sigma_min, sigma_max, sigma_data, label_dim"),
    ("tests.custom_teacher:flattening", r"to \(2, 64\); it must return x0_hat of the same shape"),
])
def test_a_wrong_factory_is_one_clear_error(factory, message):
    with pytest.raises(SidError, match=message):
        build_teacher(load_config([], python_teacher(factory)).teacher, trust_code=True)


def test_an_error_in_the_users_function_is_one_line(tmp_path):
    cfg = load_config([], python_teacher(weights=str(tmp_path / "missing.safetensors")))
    with pytest.raises(SidError, match=r"tests.custom_teacher:build with arguments .* failed: FileNotFoundError"):
        build_teacher(cfg.teacher, trust_code=True)


def test_the_config_asks_for_factory_and_shape():
    with pytest.raises(SidError, match="needs teacher.python.factory"):
        load_config([], ["teacher.kind=python", "teacher.python.shape=[1,8,8]"])
    with pytest.raises(SidError, match="teacher.python.shape"):
        load_config([], ["teacher.kind=python", f"teacher.python.factory={FACTORY}"])
    cfg = load_config([], python_teacher() + ["teacher.python.kwargs.weights=w.safetensors"])   # one key at a time
    assert dict(cfg.teacher.python.kwargs) == {"weights": "w.safetensors"}
