"""The one-step generator (sid/generator.py): G(z) = D(σ_init z; σ_init), samples that depend on their seed alone,
and the export that loads without the training code (exports written before the last renames included)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_float32_close
from sid.errors import SidError
from sid.generator import CONFIG, WEIGHTS, OneStepGenerator, export_generator, load_generator
from sid.networks import MLP
from sid.precond import EDMRule, Preconditioned

SPEC = {"kind": "analytic", "shape": [3], "width": 16, "depth": 2, "label_dim": 4, "sigma_data": 0.5}


def generator(sigma_init=2.5):
    torch.manual_seed(0)
    return OneStepGenerator(Preconditioned(MLP((3,), 16, 2, label_dim=4), EDMRule(0.5), label_dim=4), (3,),
                            sigma_init).eval()


def test_the_generator_is_the_denoiser_at_sigma_init():
    g = generator()
    z, labels = g.random_inputs(5, generator=torch.Generator().manual_seed(1))
    assert labels.shape == (5, 4) and torch.equal(labels.sum(1), torch.ones(5))        # one-hot classes
    with torch.no_grad():
        torch.testing.assert_close(g(z, labels), g.denoiser(2.5 * z, torch.full((5,), 2.5), labels))


def test_a_sample_depends_on_its_seed_alone():
    g = generator()
    whole = g.sample_seeds(range(10), batch=3)
    assert_float32_close(g.sample_seeds([7, 2]), whole[[7, 2]])        # batches of 2, not 3: another summation order
    fixed = g.sample_seeds([1, 2], classes=[3, 3])
    z, _ = g.inputs_for_seeds([1, 2])
    torch.testing.assert_close(fixed, g(z, torch.eye(4)[[3, 3]]))


def test_an_export_reloads_the_same_generator(tmp_path):
    g = generator(sigma_init=1.7)
    export_generator(g, SPEC, tmp_path / "gen", extra={"nimg": 64})
    config = json.loads((tmp_path / "gen" / CONFIG).read_text())
    assert config["sigma_init"] == 1.7 and config["nimg"] == 64 and config["denoiser"] == SPEC
    for where in (tmp_path / "gen", tmp_path / "gen" / WEIGHTS, tmp_path):             # folder, file, run folder
        if where == tmp_path:
            (tmp_path / "gen").rename(tmp_path / "generator")
            where = tmp_path
        loaded = load_generator(where)
        torch.testing.assert_close(loaded.sample_seeds(range(4)), g.sample_seeds(range(4)))
    with pytest.raises(SidError, match="no exported generator"):
        load_generator(tmp_path / "nothing")


def test_an_export_written_before_the_renames_still_loads(tmp_path):
    """Exports from before the spec was named by its teacher kind (``mlp``) and the rule was called ``rule``
    (its buffers under ``precond.``) load as they are."""
    g = generator()
    export_generator(g, SPEC, tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    config["denoiser"]["kind"] = "mlp"
    state = {k.replace("rule.", "precond."): v for k, v in load_file(tmp_path / WEIGHTS).items()}
    state["precond.table"] = torch.zeros(1)                      # a rule buffer, as the discrete VP rule has
    save_file(state, tmp_path / WEIGHTS, metadata={"sid_config": json.dumps(config)})
    with pytest.raises(SidError, match="do not fit the architecture"):   # this rule has no such buffer
        load_generator(tmp_path)
    del state["precond.table"]
    save_file(state, tmp_path / WEIGHTS, metadata={"sid_config": json.dumps(config)})
    torch.testing.assert_close(load_generator(tmp_path).sample_seeds(range(3)), g.sample_seeds(range(3)))


def test_an_export_of_an_unknown_kind_is_one_clear_error(tmp_path):
    export_generator(generator(), {**SPEC, "kind": "os.system"}, tmp_path)
    with pytest.raises(SidError, match="unknown denoiser kind 'os.system'.*another tool"):
        load_generator(tmp_path)


def test_the_public_api_is_importable_from_sid_and_costs_nothing_until_used():
    import sid

    assert {"load_config", "train", "load_generator", "build_teacher", "Teacher"} <= set(sid.__all__)
    assert sid.load_generator is load_generator
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sid.nope
    code = "import sys, sid; assert 'torch' not in sys.modules and 'accelerate' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_push_to_hub_uploads_a_readable_export_and_says_when_it_cannot(tmp_path, monkeypatch, capsys):
    """The Hub's API is replaced here (the tests never reach the network): a readable export is uploaded whole
    to a repository made if missing; an unreachable Hub is one line, the export kept; a bad id fails before."""
    import huggingface_hub

    from sid import push_to_hub
    from sid.cli import main as sid

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://hub/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    export_generator(generator(), SPEC, tmp_path / "gen")
    assert push_to_hub(tmp_path / "gen", "me/one-step", private=True) == "https://hub/me/one-step"
    assert calls[0] == ("create", "me/one-step", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][1]["folder_path"] == str(tmp_path / "gen") and calls[1][1]["repo_id"] == "me/one-step"

    def offline(self, **kw):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline mode is enabled")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", offline)
    with pytest.raises(SidError, match="could not push .* as me/one-step .*the export stays where it is"):
        push_to_hub(tmp_path / "gen", "me/one-step")
    assert (tmp_path / "gen" / WEIGHTS).is_file()
    with pytest.raises(SidError, match="no exported generator"):
        push_to_hub(tmp_path / "nothing", "me/one-step")
    python_spec = {"kind": "python", "factory": "os:getcwd", "kwargs": {}, "shape": [2]}   # needs its code run
    export_generator(generator(), python_spec, tmp_path / "foreign")
    with pytest.raises(SidError, match="trust_code"):
        push_to_hub(tmp_path / "foreign", "me/one-step")                             # never on the file's say
    assert sid(["train", "--config", "toy_2d", "--push-to-hub", "me/bad id!", f"train.run_dir={tmp_path / 'r'}"]) == 2
    assert "is not a Hub repository id" in capsys.readouterr().err and not (tmp_path / "r").exists()
