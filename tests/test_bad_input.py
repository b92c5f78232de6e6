"""Every bad input is one `error:` line (exit code 2) that says what to do, never a traceback, and the output
paths of long jobs are checked before the work starts. One table of command lines, then the cases that need a
file damaged first."""

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sid_process
from sid.cli import main as sid
from sid.config import load_config
from sid.errors import SidError
from sid.generator import CONFIG, WEIGHTS
from sid.trainer import train


def one_line(capsys, argv, code=2):
    capsys.readouterr()
    assert sid(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(("error: ", "interrupted", "terminated")), err
    return err


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 2-D toy run (its export draws points, not images)."""
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    train(load_config([], ["teacher.analytic.student_width=16", "teacher.analytic.student_fit_steps=5",
                           "optim.batch=64", "train.total_nimg=64", "train.progress=false",
                           "train.tracker=none", f"train.run_dir={run_dir}"]))
    return run_dir


@pytest.mark.parametrize("argv, message", [
    (["sample", "{gen}", "--seeds", "5-1", "--out", "{tmp}/s.npz"], "a range runs upwards, e.g. 1-5"),
    (["sample", "{gen}", "--seeds", "0-x", "--out", "{tmp}/s.npz"], "expected integers and ranges"),
    (["sample", "{gen}", "--out", "{tmp}/s.jpg"], "give a .png"),
    (["sample", "{gen}", "--classes", "1", "--out", "{tmp}/s.npz"], "this generator is unconditional"),
    (["sample", "{gen}", "--out", "{file}/s.npz"], "cannot write there"),
    (["fid", "gen", "{gen}", "--ref", "{ref}", "--num", "4", "--weights", "{weights}"], "FID measures images"),
    (["fid", "images", "--source", "{tmp}/objects.npz", "--ref", "{ref}", "--weights", "{weights}"],
     "is not an .npz of images"),
    (["fid", "ref", "--source", "{tmp}/none", "--out", "{file}/ref.npz"], "cannot write there"),
    (["train", "--config", "toy_2d", "train.run_dir={file}"], "is a file"),
    (["train", "--config", "toy_2d", "train.run_dir={file}/sub"], "cannot write to the run folder"),
    (["train", "teacher.kind=diffusers", "teacher.diffusers.path=runs/my_teachr"], "does not exist"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["sweep", "report", "{tmp}/no_sweep"], "no sweep folder"),
])
def test_one_line_each(argv, message, toy_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()                                       # a local folder the mistyped path is in
    (tmp_path / "afile").write_text("x")
    np.savez(tmp_path / "objects.npz", images=np.array([{"a": 1}], dtype=object))
    extractor = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    torch.jit.save(torch.jit.script(extractor), str(tmp_path / "features.pt"))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(12), sigma=np.eye(12))
    names = {"gen": toy_run / "generator", "tmp": tmp_path, "file": tmp_path / "afile", "ref": tmp_path / "ref.npz",
             "weights": tmp_path / "features.pt"}
    err = one_line(capsys, [a.format(**names) for a in argv])
    assert message in err, err


def test_output_folders_are_made_before_the_work(toy_run, tmp_path, capsys):
    capsys.readouterr()
    assert sid(["sample", str(toy_run / "generator"), "--seeds", "0-9", "--out", str(tmp_path / "a/b/s.npz"),
                "--batch", "4", "--progress"]) == 0
    assert np.load(tmp_path / "a/b/s.npz")["samples"].shape == (10, 2)
    assert "sampling: 100%" in capsys.readouterr().err                             # in batches of 4, with a bar


def test_resume_followed_by_an_override_takes_it_as_an_override(toy_run, capsys):
    """`--resume train.max_seconds=60` is an override after a bare --resume, not a checkpoint path."""
    assert sid(["train", "--resume", "train.total_nimg=128", "teacher.analytic.student_width=16",
                "teacher.analytic.student_fit_steps=5", "optim.batch=64", "train.progress=false",
                "train.tracker=none", f"train.run_dir={toy_run}"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_damaged_generator_metadata_is_one_line(toy_run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = toy_run / "generator" / WEIGHTS
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["sid_config"])
    state = load_file(source)
    for broken in ({**config, "shape": "2"}, {**config, "sigma_init": -1}, {k: v for k, v in config.items()
                                                                          if k != "denoiser"},
                   {**config, "denoiser": {**config["denoiser"], "width": 10**7}}, [1, 2]):
        save_file(state, tmp_path / WEIGHTS, metadata={**metadata, "sid_config": json.dumps(broken)})
        err = one_line(capsys, ["sample", str(tmp_path / WEIGHTS), "--out", str(tmp_path / "s.npz")])
        assert "not a readable exported generator" in err or "its weights hold" in err, err
    save_file(state, tmp_path / WEIGHTS, metadata={"other": "x"})
    assert "sid_config" in one_line(capsys, ["sample", str(tmp_path / WEIGHTS), "--out", str(tmp_path / "s.npz")])
    data = bytearray(source.read_bytes())
    data[-5] ^= 0x01                                                               # a flipped bit in a weight
    (tmp_path / CONFIG).write_text("{}")
    (tmp_path / WEIGHTS).write_bytes(bytes(data))
    assert "do not match their checksum" in one_line(capsys, ["sample", str(tmp_path / WEIGHTS), "--out",
                                                              str(tmp_path / "s.npz")])


def test_a_damaged_edm_pickle_is_one_line_whatever_the_byte(edm_side, tmp_path):
    from edm_pickles import write_snapshot
    from sid.teachers import build_teacher

    write_snapshot(tmp_path / "net.pkl", edm_side.EDMPrecond(8, 1))
    data = (tmp_path / "net.pkl").read_bytes()
    rng = np.random.default_rng(0)
    for position in rng.choice(len(data), 60, replace=False):
        damaged = bytearray(data)
        damaged[position] = (damaged[position] + 1 + rng.integers(254)) % 256
        (tmp_path / "bad.pkl").write_bytes(bytes(damaged))
        cfg = load_config([], ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={tmp_path / 'bad.pkl'}"])
        try:
            build_teacher(cfg.teacher, trust_code=True)
        except SidError:
            pass                                                                   # one line: fine
        # anything else propagates and fails the test


@pytest.mark.slow                                             # a child process
def test_hostile_files_in_a_sweep_folder_skip_that_run(toy_run, tmp_path, capsys):
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(toy_run, sweep / "lam=good")
    for name, files in {"lam=json": {"metrics.jsonl": "{not json"}, "lam=yaml": {"config.yaml": "a: [1\n"},
                        "lam=status": {"status.json": "[1]"}}.items():
        shutil.copytree(toy_run, sweep / name)
        for file, text in files.items():
            (sweep / name / file).write_text(text)
    capsys.readouterr()
    assert sid(["sweep", "report", str(sweep)]) == 0
    err = capsys.readouterr().err
    assert all(f"skipping {sweep / n}" in err for n in ("lam=json", "lam=yaml", "lam=status"))
    assert "lam=good" in (sweep / "report.md").read_text()
    (sweep / "lam=0.5").mkdir()
    (sweep / "lam=0.5" / "status.json").write_text("{not json")
    out = sid_process("sweep", "run", "--config", "toy_2d", "--out", sweep, "loss.lam=0.5,1.0", "--dry-run")
    assert out.returncode == 0 and "broken" in out.stdout and "its status.json is unreadable" in out.stderr


@pytest.mark.parametrize("where", ["build", "sample"])
def test_sigterm_before_the_loop_and_while_sampling_is_one_line(where, toy_run, tmp_path, capsys, monkeypatch):
    def terminate(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    if where == "build":
        monkeypatch.setattr("sid.run.build_teacher", terminate)
        err = one_line(capsys, ["train", "--config", "toy_2d", f"train.run_dir={tmp_path / 'run'}"], code=130)
        assert "--resume continues the run" in err
    else:
        monkeypatch.setattr("sid.commands.sample.write", terminate)
        one_line(capsys, ["sample", str(toy_run / "generator"), "--out", str(tmp_path / "s.npz")], code=130)
    assert signal.getsignal(signal.SIGTERM) is handler                             # restored


def foreign_pickle(path, source, class_name="EDMPrecond"):
    """An EDM-format pickle of an object of ``class_name`` from ``source``, its state restored on unpickling."""
    import pickle

    from edm_pickles import _reconstruct_persistent_obj

    class Persistent:
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src=source, class_name=class_name, state={"x": 1})
            return _reconstruct_persistent_obj, (meta,)

    path.write_bytes(pickle.dumps({"ema": Persistent()}))
    return path


@pytest.mark.parametrize("raised", ["ValueError()", "KeyError()", "OSError()", "ZeroDivisionError()",
                                    "EOFError()"])
@pytest.mark.parametrize("where", ["import", "setstate"])
def test_a_trusted_pickle_that_fails_in_any_way_is_one_line(raised, where, edm_side, tmp_path):
    """Its code raising an exception without text, or one of any type, as it is imported or restored."""
    from sid.teachers import build_teacher

    body = f"raise {raised}\n"
    source = (body if where == "import" else "") + \
        ("import torch\nclass EDMPrecond(torch.nn.Module):\n    def __setstate__(self, state):\n        " +
         (body if where == "setstate" else "self.__dict__.update(state)\n"))
    path = foreign_pickle(tmp_path / "net.pkl", source)
    cfg = load_config([], ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={path}"])
    with pytest.raises(SidError, match=raised.split("(")[0]) as e:
        build_teacher(cfg.teacher, trust_code=True)
    assert "\n" not in str(e.value)


def test_a_pickled_network_that_is_not_an_edm_network_is_one_line(edm_side, tmp_path):
    """An EDMPrecond without its .model, and one whose attributes are not numbers."""
    from sid.teachers import build_teacher

    for state in ("{'sigma_data': 0.5}", "{'sigma_data': 'half', 'model': None}"):
        source = ("import torch\nclass EDMPrecond(torch.nn.Module):\n    def __setstate__(self, state):\n"
                  f"        torch.nn.Module.__init__(self)\n        self.__dict__.update({state})\n")
        path = foreign_pickle(tmp_path / "net.pkl", source)
        cfg = load_config([], ["teacher.kind=edm_pickle", f"teacher.edm_pickle.path={path}"])
        with pytest.raises(SidError, match=r"\(EDMPrecond\) is not an EDM network sid can use"):
            build_teacher(cfg.teacher, trust_code=True)


def test_an_exception_without_text_is_quoted_by_its_type():
    """Every error line quotes another exception through sid.errors: by its first line, or its type's name where
    it has no text (str(e).splitlines()[0] would raise IndexError on those)."""
    from sid.errors import described, first_line

    assert first_line(EOFError()) == "EOFError" and described(KeyError()) == "KeyError"
    assert described(ValueError("bad\nworse")) == "ValueError: bad"
    assert first_line(ValueError("x" * 500), 10) == "x" * 10
    assert described(OSError("  ")) == "OSError"


def test_sites_that_quote_an_exception_survive_one_without_text(tmp_path, monkeypatch, capsys):
    """Each entry's error line when the library under it raises an exception without text: an .npz (sid fid ref),
    a config file, a training state, an export."""
    from sid import checkpoint, data, generator
    from sid import config as configs
    from sid.checkpoint import load_training_state, save_training_state

    def bare(error):
        def raises(*args, **kwargs):
            raise error()
        return raises

    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.setattr(data.np, "load", bare(EOFError))                  # a zip member that ends early
    assert sid(["fid", "ref", "--source", str(tmp_path / "x.npz"), "--out", str(tmp_path / "r.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(EOFError)" in err, err
    (tmp_path / "c.yaml").write_text("loss: {lam: 1}\n")
    monkeypatch.setattr(configs.OmegaConf, "load", bare(ValueError))
    with pytest.raises(SidError, match=r"not a readable YAML file \(ValueError\)"):
        load_config([tmp_path / "c.yaml"])
    monkeypatch.undo()
    save_training_state(tmp_path / "run", 8, {"nimg": 8, "step": 1, "w": torch.ones(2)})
    monkeypatch.setattr(checkpoint, "load_file", bare(KeyError))
    with pytest.raises(SidError, match=r"unreadable \(KeyError\)"):
        load_training_state(tmp_path / "run" / "training-state-000000000008")
    monkeypatch.setattr(generator, "safe_open", bare(ValueError))
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generator.safetensors").write_bytes(b"x")
    with pytest.raises(SidError, match=r"not a readable exported generator \(ValueError\)"):
        generator.load_generator(tmp_path / "gen")


def test_the_command_line_reads_as_it_is_written(toy_run, tmp_path, capsys):
    """An override whose YAML does not parse is one line (sid train, sid sweep run); flags may stand between the
    overrides; a --resume path with '=' in it (a sweep's grid folder) is a path; ~ is the home folder."""
    for argv in (["train", "--config", "toy_2d", "optim.g_betas=[0.0,0.9", "--dry-run"],
                 ["sweep", "run", "--config", "toy_2d", "--out", str(tmp_path / "sw"), "optim.g_betas=[0.0,0.9"]):
        assert "the override 'optim.g_betas=[0.0,0.9' has a value that is not YAML" in one_line(capsys, argv)
    assert sid(["train", "--config", "toy_2d", "loss.lam=1", "--trust-code", "optim.batch=64", "--dry-run"]) == 0
    assert "batch: 64" in capsys.readouterr().out
    assert sid(["sweep", "run", "--config", "toy_2d", "--out", str(tmp_path / "sw"), "loss.lam=0.5,1.0",
                "--trust-code", "train.total_nimg=64", "--dry-run"]) == 0
    assert "train.total_nimg=64" in capsys.readouterr().out
    assert "unrecognized arguments: --bogus" in one_line(capsys, ["sweep", "run", "--config", "toy_2d", "--out",
                                                                  str(tmp_path / "sw"), "--bogus"])
    grid = tmp_path / "lam=0.5"
    shutil.copytree(toy_run, grid)
    assert sid(["train", "--config", "toy_2d", "--resume", str(grid), f"train.run_dir={grid}", "--dry-run"]) == 0
    assert f"run_dir: {grid}" in capsys.readouterr().out
    assert load_config([], ["train.run_dir=~/runs/x"]).train.run_dir == str(Path.home() / "runs" / "x")


def test_a_state_counting_past_any_run_is_refused(tmp_path):
    from sid.checkpoint import load_training_state, save_training_state

    save_training_state(tmp_path, 8, {"nimg": 8, "step": 1, "w": torch.ones(2)})
    path = tmp_path / "training-state-000000000008" / "state.json"
    saved = json.loads(path.read_text())
    saved["state"]["nimg"] = 10**30
    path.write_text(json.dumps(saved))
    with pytest.raises(SidError, match="nimg=10+ is not a count"):
        load_training_state(path.parent)


def test_a_damaged_feature_extractor_of_ones_own_is_named_as_such(tmp_path, capsys):
    from sid.metrics import feature_extractor

    (tmp_path / "mine.pt").write_bytes(b"not torchscript")
    with pytest.raises(SidError, match=r"cannot load the feature extractor .*mine.pt .*give --weights") as e:
        feature_extractor(str(tmp_path / "mine.pt"))
    assert "fid-helper" not in str(e.value)


def test_an_export_recording_a_shape_its_network_does_not_take_is_one_line(toy_run, tmp_path, capsys):
    """The 2-D MLP's export with shape [3] in its metadata: one line at load, not a matmul error in sid sample."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = toy_run / "generator" / WEIGHTS
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["sid_config"])
    (tmp_path / "gen").mkdir()
    save_file(load_file(source), tmp_path / "gen" / WEIGHTS,
              metadata={**metadata, "sid_config": json.dumps({**config, "shape": [3]})})
    err = one_line(capsys, ["sample", str(tmp_path / "gen"), "--seeds", "0-3", "--out", str(tmp_path / "s.npz")])
    assert "records samples of shape 3, its network takes 2; export it again" in err


def test_a_path_part_too_long_for_any_file_system_is_one_line():
    with pytest.raises(SidError, match=r"train.run_dir: its part x+\.\.\. is 300 bytes long.*at most 255"):
        load_config([], [f"train.run_dir=runs/{'x' * 300}"])


def test_running_out_of_cpu_memory_is_one_line(tmp_path, capsys, monkeypatch):
    """optim.batch=10^12 passes the config (a number) and then asks the allocator for terabytes: one line saying
    what to lower (the allocation itself simulated here: a real one may be granted lazily and killed later)."""
    import sid.trainer

    def huge(run):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 8000000000000 bytes. Error code 12")

    monkeypatch.setattr(sid.trainer, "iteration", huge)
    err = one_line(capsys, ["train", "--config", "toy_2d", "optim.batch=1000000000000", "train.progress=false",
                            "teacher.analytic.student_fit_steps=5", f"train.run_dir={tmp_path / 'run'}"])
    assert "out of CPU memory (tried to allocate 7,450.6 GiB) at optim.batch_gpu=1000000000000" in err


def test_one_bad_run_of_a_sweep_is_reported_and_skipped(toy_run, tmp_path, capsys):
    """A diverged run's own log ending in NaN (nothing left for a log scale), a config without loss:, a status.json
    with a string for nimg: that run is marked or skipped, the rest reported; report.md taken by a folder is one
    line."""
    sweep = tmp_path / "sweep"
    shutil.copytree(toy_run, sweep / "lam=good")
    shutil.copytree(toy_run, sweep / "lam=nan")
    (sweep / "lam=nan" / "metrics.jsonl").write_text('{"nimg": 64, "loss_g": NaN, "loss_fake": NaN}\n'
                                                     '{"nimg": 64, "swd": NaN}\n')
    shutil.copytree(toy_run, sweep / "lam=noloss")
    (sweep / "lam=noloss" / "config.yaml").write_text("train: {seed: 0}\n")
    capsys.readouterr()
    assert sid(["sweep", "report", str(sweep)]) == 0
    assert f"skipping {sweep / 'lam=noloss'}: ValueError: its config.yaml names no loss.lam" in capsys.readouterr().err
    report = (sweep / "report.md").read_text()
    assert "lam=good" in report and "lam=nan: non-finite" in report
    (sweep / "report.md").unlink()
    (sweep / "report.md").mkdir()
    assert sid(["sweep", "report", str(sweep)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: could not write the report")
    (sweep / "lam=0.5").mkdir()
    (sweep / "lam=0.5" / "status.json").write_text('{"state": "finished", "nimg": "lots"}')
    assert sid(["sweep", "run", "--config", "toy_2d", "--out", str(sweep), "loss.lam=0.5,1.0", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "broken" in out.out and "its status.json is unreadable" in out.err


@pytest.mark.parametrize("why", ["offline mode", "no answer"])
def test_an_unreachable_hub_is_said_at_once_and_nothing_else_is_guessed(why, monkeypatch, capsys):
    """A hub id not in the cache while the hub cannot be reached (HF_HUB_OFFLINE, or a request that gets no answer):
    one probe, no half-minute retries, and the plan says so instead of guessing another cause."""
    import time

    import huggingface_hub

    from sid.teachers.diffusers import files

    class NoAnswer:
        def head(self, *args, **kwargs):
            raise ConnectionError("[Errno -2] Name or service not known")

    files.hub_unreachable.cache_clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", why == "offline mode")
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: NoAnswer())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent-cache")
    start = time.time()
    try:
        assert sid(["train", "--config", "sd3_medium_dit", "teacher.diffusers.path=owner/unshipped-sd3",
                    "--dry-run"]) == 0                     # a hub id whose architecture sid does not ship
    finally:
        files.hub_unreachable.cache_clear()
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("# memory plan: not made: teacher 'owner/unshipped-sd3' is "
                           "neither a local folder nor a reachable hub model: not in the Hugging Face cache"), line
    assert ("HF_HUB_OFFLINE" if why == "offline mode" else "ConnectionError") in line and "pixel-space" not in line
    assert time.time() - start < 30                                      # the hub client's retries take a minute


def test_the_dry_run_refuses_a_micro_batch_that_cannot_fit(capsys):
    """optim.batch=10^12 on the toy: the plan (for this machine's CPU, no GPU being visible) exceeds its memory and
    says what fits; an analytic teacher is planned too (its students unfitted: sizes only)."""
    assert sid(["train", "--config", "toy_2d", "optim.batch=1000000000000", "--dry-run", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "# memory plan, per process (1 process; micro-batch 1000000000000):" in out
    assert "# exceeds 80.00 GiB by" in out and "optim.batch_gpu=1: " in out and "<- fits" in out
