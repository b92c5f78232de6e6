"""Foreign code runs only on the command line's say: a payload whose import or unpickling writes a marker file,
reached through every entry point. Without --trust-code (trust_code=True) the marker never appears and the
command says what to pass in one line; with it, the payload runs."""

import json
import pickle

import pytest
import torch

from sid.cli import main as sid
from sid.config import load_config
from sid.errors import SidError
from sid.generator import export_generator, load_generator

SHAPE = [1, 8, 8]


def python_payload(folder, name, marker):
    """A module whose import writes ``marker``, with a factory returning a valid denoiser."""
    (folder / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from tests.custom_teacher import build\n")
    return f"{name}:build"


def edm_payload(path, marker):
    """An EDM-format pickle whose unpickling executes source that writes ``marker``."""
    source = f"open({str(marker)!r}, 'w').write('unpickled')\nimport torch\nclass Net(torch.nn.Module):\n    pass\n"

    class Payload:
        def __reduce__(self):
            from edm_pickles import _reconstruct_persistent_obj

            return _reconstruct_persistent_obj, (dict(type="class", version=6, module_src=source, class_name="Net",
                                                      state={}),)

    with open(path, "wb") as f:
        pickle.dump({"ema": Payload()}, f)
    return path


def teacher_config(tmp_path, kind, marker, name):
    if kind == "python":
        section = {"kind": "python", "python": {"factory": python_payload(tmp_path, name, marker), "shape": SHAPE}}
    else:
        section = {"kind": "edm_pickle", "edm_pickle": {"path": str(edm_payload(tmp_path / f"{name}.pkl", marker))}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"teacher": section, "train": {"run_dir": str(tmp_path / f"run_{name}"),
                                                              "progress": False, "total_nimg": 8},
                                "optim": {"batch": 4}}))
    return path


def exported(tmp_path, kind, marker, name):
    """A generator export whose spec names the payload (as one distilled from such a teacher would)."""
    from sid.teachers.edm_pickle import sha256
    from tests.custom_teacher import build

    if kind == "python":
        spec = {"kind": "python", "factory": python_payload(tmp_path, name, marker), "kwargs": {}, "shape": SHAPE}
    else:
        path = edm_payload(tmp_path / f"{name}.pkl", marker)
        spec = {"kind": "edm_pickle", "path": str(path), "sha256": sha256(path), "sigma_data": 0.5, "dropout": None}
    from sid.generator import OneStepGenerator

    folder = tmp_path / f"sweep_{name}" / "run" / "generator"
    export_generator(OneStepGenerator(build(), SHAPE), spec, folder)
    (folder.parent / "config.yaml").write_text("loss: {lam: sid}\n")
    return folder


def reference(folder):
    """Reference statistics and a tiny TorchScript feature extractor for them, so that `sid fid` gets as far as
    loading its network."""
    import numpy as np

    extractor = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())     # 3 × 2 × 2 features
    torch.jit.save(torch.jit.script(extractor), str(folder / "features.pt"))
    np.savez(folder / "ref.npz", mu=np.zeros(12), sigma=np.eye(12))
    return folder / "ref.npz", folder / "features.pt"


ENTRY_POINTS = {
    "sid train": lambda cfg, gen, ref: ["train", "--config", str(cfg)],
    "sid sweep run": lambda cfg, gen, ref: ["sweep", "run", "--config", str(cfg), "loss.lam=sid",
                                            "--out", str(cfg.parent / f"sw_{cfg.stem}")],
    "sid sample --teacher": lambda cfg, gen, ref: ["sample", "--teacher", str(cfg), "--steps", "2", "--seeds", "0-1",
                                                   "--out", str(cfg.parent / "t.npz")],
    "sid fid teacher": lambda cfg, gen, ref: ["fid", "teacher", "--config", str(cfg), "--ref", str(ref[0]),
                                              "--steps", "2", "--num", "2", "--weights", str(ref[1])],
    "sid sample (export)": lambda cfg, gen, ref: ["sample", str(gen), "--seeds", "0-1",
                                                  "--out", str(gen.parent / "s.npz")],
    "sid fid gen": lambda cfg, gen, ref: ["fid", "gen", str(gen), "--ref", str(ref[0]), "--num", "2",
                                          "--weights", str(ref[1])],
    "sid sweep report": lambda cfg, gen, ref: ["sweep", "report", str(gen.parent.parent)],
}


@pytest.mark.parametrize("kind", ["python", "edm_pickle"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_no_payload_runs_without_the_flag_and_it_does_with_it(entry, kind, tmp_path, monkeypatch, capsys, edm_side):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = reference(tmp_path)
    for trusted in (False, True):
        marker = tmp_path / f"marker_{trusted}"
        name = f"payload_{kind}_{trusted}_{list(ENTRY_POINTS).index(entry)}"          # modules import once
        cfg, gen = teacher_config(tmp_path, kind, marker, name), exported(tmp_path, kind, marker, name + "_gen")
        argv = ENTRY_POINTS[entry](cfg, gen, ref) + (["--trust-code"] if trusted else [])
        capsys.readouterr()
        try:
            code = sid(argv)
        except Exception:              # with the flag the payload runs, and may then fail in its own way
            code = None
        err = capsys.readouterr().err
        if not trusted:
            assert not marker.exists(), (entry, kind)
            failed = (tmp_path / f"sw_{name}").glob("*/status.json") if entry == "sid sweep run" else []
            said = [json.loads(p.read_text())["error"] for p in failed] or [err]
            assert code in (0, 2) and any("--trust-code" in s or "trust_code=True" in s for s in said), said
        else:
            assert marker.exists(), (entry, kind)


def test_a_config_cannot_grant_trust_to_itself(tmp_path):
    (tmp_path / "grant.yaml").write_text("teacher:\n  kind: edm_pickle\n  edm_pickle:\n    trust: true\n")
    with pytest.raises(SidError, match=r"'teacher.edm_pickle.trust' .* is gone: .*--trust-code"):
        load_config([tmp_path / "grant.yaml"])
    with pytest.raises(SidError, match="is gone"):
        load_config([], ["teacher.edm_pickle.trust=true"])


def test_the_python_api_takes_the_flag_in_the_call(tmp_path, monkeypatch, edm_side):
    from sid.teachers import build_teacher

    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "marker"
    for kind in ("python", "edm_pickle"):
        cfg = load_config([teacher_config(tmp_path, kind, marker, f"api_{kind}")])
        with pytest.raises(SidError, match="trust_code=True"):
            build_teacher(cfg.teacher)
        gen = exported(tmp_path, kind, marker, f"api_{kind}_gen")
        with pytest.raises(SidError, match="trust_code=True"):
            load_generator(gen)
        assert not marker.exists()


def custom_code_pipeline(tiny_pipeline, folder, part, marker):
    """The tiny Stable Diffusion pipeline with its text encoder or tokenizer as a transformers ``Auto`` class whose
    config maps it (``auto_map``) to a module beside it, on a model type transformers does not know: the module's
    import writes ``marker``."""
    import shutil

    shutil.copytree(tiny_pipeline("sd"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    base = "CLIPTextModel" if part == "text_encoder" else "CLIPTokenizer"
    index[part] = ["transformers", "AutoModel" if part == "text_encoder" else "AutoTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    module = f"custom_{part}"
    (folder / part / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        f"from transformers import CLIPTextConfig, {base}\n"
        "class CustomConfig(CLIPTextConfig):\n    model_type = 'sid-test-custom'\n"
        f"class Custom({base}):\n    config_class = CustomConfig\n")
    if part == "text_encoder":
        config = json.loads((folder / part / "config.json").read_text())
        config.update(model_type="sid-test-custom", auto_map={"AutoConfig": f"{module}.CustomConfig",
                                                               "AutoModel": f"{module}.Custom"})
        (folder / part / "config.json").write_text(json.dumps(config))
    else:
        config = json.loads((folder / part / "tokenizer_config.json").read_text())
        config.update(auto_map={"AutoTokenizer": [f"{module}.Custom", None]})
        (folder / part / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("part", ["text_encoder", "tokenizer"])
def test_a_pipelines_own_text_encoder_or_tokenizer_code_runs_only_with_the_flag(part, tiny_pipeline, tmp_path,
                                                                                 monkeypatch, capsys):
    """transformers would ask on stdin whether to run the folder's code, and `yes | sid ...` would answer: sid tells
    it (trust_remote_code) and refuses in one line without --trust-code, whatever stdin says; with it, the code
    runs."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 100))
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    marker = tmp_path / "marker"
    folder = custom_code_pipeline(tiny_pipeline, tmp_path / "pipeline", part, marker)
    sample = ["sample", "--teacher", str(folder), "--prompt", "a cat", "--steps", "2", "--seeds", "0-1",
              "--out", str(tmp_path / "t.png")]
    train = ["train", "teacher.kind=diffusers", f"teacher.diffusers.path={folder}",
             f"conditions.prompts={tmp_path / 'prompts.txt'}", "optim.batch=2", "train.total_nimg=2",
             f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.tracker=none"]
    for argv in (sample, train):
        capsys.readouterr()
        assert sid(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"its {part} names code of its own" in err and "--trust-code" in err, err
    assert sid([*train, "--dry-run"]) == 0                                   # the config, and why no plan
    assert f"# memory plan: not made: {folder}: its {part} names code of its own" in capsys.readouterr().out
    assert not marker.exists()
    assert sid([*sample, "--trust-code"]) == 0 and marker.exists()
