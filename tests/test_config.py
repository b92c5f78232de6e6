"""Config schema, presets, overrides, validation and the `sid` command's dry run."""

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, sid_process
from sid.config import PRESETS, Config, TeacherTrainingConfig, load_config, preset_names
from sid.errors import SidError


def test_base_yaml_lists_every_default():
    assert OmegaConf.to_container(OmegaConf.load(PRESETS / "base.yaml")) == \
        OmegaConf.to_container(OmegaConf.structured(Config))


@pytest.mark.parametrize("preset", preset_names())
def test_presets_load_by_name_and_only_override_known_keys(preset):
    schema = TeacherTrainingConfig if preset.startswith("teacher/") else Config
    assert load_config([preset], schema_class=schema) == load_config([PRESETS / f"{preset}.yaml"], schema_class=schema)


def test_a_file_comes_before_a_preset_of_the_same_name(tmp_path, monkeypatch):
    assert {"fmnist", "toy_2d", "cifar10_edm", "teacher/fmnist", "speed/cifar_unet"} <= set(preset_names())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy_2d").write_text("loss: {lam: 0.3}\n")
    assert load_config(["toy_2d"]).loss.lam == "0.3" and load_config(["toy_2d.yaml"]).loss.lam != "0.3"
    with pytest.raises(SidError, match=r"config toy2d: no such file, and no shipped preset .*\(base, cifar10_edm, "):
        load_config(["toy2d"])
    with pytest.raises(SidError, match="no such file"):                 # a path is not a name
        load_config([PRESETS / "toy_2d"])


def test_the_command_lists_its_subcommands():
    out = sid_process("--help")
    assert out.returncode == 0 and all(f"sid {c}" in out.stdout for c in ("train", "teacher", "sweep", "sample", "fid"))
    assert f"Shipped presets: {', '.join(preset_names())}." in out.stdout
    out = sid_process("--version")
    assert out.returncode == 0 and out.stdout.startswith("sid 0.")
    out = sid_process("distil")
    assert out.returncode == 2 and out.stderr.startswith("error: unknown command 'distil'") and not out.stdout


def test_overrides_apply_last_and_config_is_read_only():
    cfg = load_config(["toy_2d"], ["loss.lam=0.75", "optim.batch=64"])
    assert cfg.loss.lam == "0.75" and cfg.optim.batch == 64
    with pytest.raises(Exception):
        cfg.optim.batch = 1


@pytest.mark.parametrize("override,message", [
    ("loss.lamb=1", "unknown config key 'loss.lamb'.*valid keys under loss: .*lam"),
    ("foo=1", "unknown config key 'foo'"),
    ("loss.lam=big", "neither a number nor a preset"),
    ("loss.weighting=snr", r"loss.weighting='snr' is invalid; choose one of \('sid', 'x0', 'eps'\)"),
    ("optim.batch=abc", "bad value for config key 'optim.batch'"),
    ("optim.g_lr=-1", "optim.g_lr=-1.0 must be positive"),
    ("teacher.kind=diffusers", "needs teacher.diffusers.path"),
])
def test_bad_values_name_the_key_and_the_choices(override, message):
    with pytest.raises(SidError, match=message):
        load_config([], [override])


@pytest.mark.parametrize("gpu", [False, True])
def test_on_cpu_settings_apply_only_without_a_gpu_and_the_command_line_wins(gpu, monkeypatch, tmp_path):
    monkeypatch.setattr("sid.config.gpu_visible", lambda: gpu)
    (tmp_path / "p.yaml").write_text("optim: {batch: 256}\non_cpu: {optim: {batch: 32}, train: {max_seconds: 60}}\n")
    cfg = load_config([tmp_path / "p.yaml"])
    assert (cfg.optim.batch, cfg.train.max_seconds) == ((256, 0) if gpu else (32, 60))
    cfg = load_config([tmp_path / "p.yaml"], ["train.max_seconds=5", "on_cpu.optim.batch=16"])
    assert (cfg.optim.batch, cfg.train.max_seconds) == ((256, 5) if gpu else (16, 5))


@pytest.mark.parametrize("gpu", [False, True])
def test_unknown_on_cpu_keys_are_rejected_on_every_machine(gpu, monkeypatch):
    monkeypatch.setattr("sid.config.gpu_visible", lambda: gpu)
    with pytest.raises(SidError, match="unknown config key 'optim.bach' in on_cpu"):
        load_config([], ["on_cpu.optim.bach=3"])


def test_missing_config_file():
    with pytest.raises(SidError, match="config nope.yaml: no such file"):
        load_config(["nope.yaml"])


def run_cli(*args, cwd=ROOT):
    return sid_process("train", *args, cwd=cwd)


def test_dry_run_prints_the_resolved_config():
    out = run_cli("--config", "toy_2d", "loss.lam=fgm", "--dry-run")
    assert out.returncode == 0
    assert OmegaConf.create(out.stdout).loss.lam == "fgm"


def test_unknown_key_is_one_clear_line():
    out = run_cli("loss.lamb=1")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: unknown config key 'loss.lamb'")
