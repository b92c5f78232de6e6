"""Config schema, presets, overrides, validation and the CLI's dry run."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from sid.config import Config, load_config
from sid.errors import SidError


def test_base_yaml_lists_every_default():
    assert OmegaConf.to_container(OmegaConf.load(ROOT / "configs/base.yaml")) == \
        OmegaConf.to_container(OmegaConf.structured(Config))


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load_and_only_override_known_keys(preset):
    load_config([preset])


@pytest.mark.parametrize("preset", sorted((ROOT / "configs/teacher").glob("*.yaml")), ids=lambda p: p.name)
def test_teacher_presets_load(preset):
    from sid.config import TeacherTrainingConfig

    load_config([preset], schema_class=TeacherTrainingConfig)


def test_overrides_apply_last_and_config_is_read_only():
    cfg = load_config([ROOT / "configs/toy_2d.yaml"], ["loss.lam=0.75", "optim.batch=64"])
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
    with pytest.raises(SidError, match="not found"):
        load_config(["nope.yaml"])


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_dry_run_prints_the_resolved_config():
    out = run_cli("--config", "configs/toy_2d.yaml", "loss.lam=fgm", "--dry-run")
    assert out.returncode == 0
    assert OmegaConf.create(out.stdout).loss.lam == "fgm"


def test_unknown_key_is_one_clear_line():
    out = run_cli("loss.lamb=1")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: unknown config key 'loss.lamb'")
