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
    ("loss.weighting=snr",
     r"loss.weighting='snr' is invalid; choose one of \('sid', 'x0', 'eps', 'one_minus_t', 'velocity'\)"),
    ("loss.time=edm", r"loss.time='edm' is invalid; choose one of \('karras', 'timesteps', 'logit_normal'\)"),
    ("optim.batch=abc", "bad value for config key 'optim.batch'"),
    ("optim.g_lr=-1", r"optim.g_lr=-1.0 is out of range: it must be > 0"),
    ("teacher.kind=diffusers", "needs teacher.diffusers.path"),
    # every value finite and in range, the key and the range in the line
    ("optim.fake_lr=nan", "optim.fake_lr=nan must be a finite number"),
    ("optim.g_lr=inf", "optim.g_lr=inf must be a finite number"),
    ("optim.g_betas=[0.9,1.0]", r"optim.g_betas=\[0.9, 1.0\] must be two numbers in \[0, 1\)"),
    ("optim.fake_betas=[0.5]", "optim.fake_betas=.* must be two numbers"),
    ("optim.eps=0", "optim.eps=0.0 is out of range: it must be > 0"),
    ("loss.lam=inf", "loss.lam=inf must be a finite number"),
    ("loss.g_scale=0", "loss.g_scale=0.0 is out of range"),
    ("loss.sigma_min=0", "loss.sigma_min=0.0 is out of range: it must be > 0, or null"),
    ("loss.sigma_max=-1", "loss.sigma_max=-1.0 is out of range: it must be > 0, or null"),
    ("generator.sigma_init=0", "generator.sigma_init=0.0 is out of range: it must be > 0"),
    ("ema.halflife_nimg=-1", "ema.halflife_nimg=-1 is out of range: it must be >= 0"),
    ("ema.halflife_nimg=[5,5]", r"ema.halflife_nimg=\[5, 5\] is out of range: .* a list of distinct such numbers"),
    ("optim.batch_gpu=48", "optim.batch_gpu=48 must be a positive divisor of optim.batch=256"),
    ("optim.batch=0", "optim.batch=0 is out of range: it must be a positive integer"),
    ("train.num_samples=0", "train.num_samples=0 is out of range"),
    ("eval.num=1", r"eval.num=1 is out of range: it must be in \[2, 10\^7\]"),
    ("train.seed=-1", r"train.seed=-1 is out of range: it must be in \[0, 2\^63\)"),
    ("train.seed=9223372036854775808", "train.seed"),
    ("teacher.analytic.shape=[0,4]", r"teacher.analytic.shape=\[0, 4\] is out of range"),
    ("teacher.analytic.student_width=10000000", "teacher.analytic.student_width=10000000 is out of range"),
    ("teacher.analytic.weights=[1,2]", "teacher.analytic.weights has 2 values for teacher.analytic.modes=8"),
    ("train.run_dir=${nope}", "config key 'train.run_dir' cannot be resolved"),
    ("teacher.edm_pickle.trust=true", "is gone: .*--trust-code"),
    ("train.tensorboard=false", "is gone: the tracker is now chosen by train.tracker: auto .*none, or one of "
                                "tensorboard, wandb"),
    ("train.tracker=tensorbord", "train.tracker='tensorbord' is invalid; choose one of .*'tensorboard'"),
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


@pytest.mark.parametrize("text,message", [
    ("a: [1\n", "ParserError"),
    ("loss:\n\tlam: 1\n", "found character '\\\\t' that cannot start any token, line 2"),
    ("loss: {lam: 1}\nloss: {lam: 2}\n", "found duplicate key loss"),
    ("loss: !!python/object:os.system {}\n", "could not determine a constructor"),
    ("- 1\n- 2\n", "holds a list, not a mapping"),
    ("7\n", "Invalid loaded object type: int"),
    ("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10)), "aliases expand"),
    (b"\x7fELF\x02\x01\x01\x00\xd0\x00", "UnicodeDecodeError"),
])
def test_every_damaged_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SidError, match=f"config .*bad.yaml .*{message}"):
        load_config([path])
    out = sid_process("train", "--config", path, "--dry-run")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: config ")


def test_a_config_name_too_long_for_the_file_system_is_one_line():
    with pytest.raises(SidError, match=r"config x{200}\.\.\.: no such file"):
        load_config(["x" * 5000])


def test_missing_config_file():
    with pytest.raises(SidError, match="config nope.yaml: no such file"):
        load_config(["nope.yaml"])


def run_cli(*args, cwd=ROOT):
    return sid_process("train", *args, cwd=cwd)


@pytest.mark.slow                                             # a child process
def test_dry_run_prints_the_resolved_config():
    out = run_cli("--config", "toy_2d", "loss.lam=fgm", "--dry-run")
    assert out.returncode == 0
    assert OmegaConf.create(out.stdout).loss.lam == "fgm"


def test_unknown_key_is_one_clear_line():
    out = run_cli("loss.lamb=1")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: unknown config key 'loss.lamb'")


def test_the_tracker_choices_are_accelerates():
    from accelerate.utils import LoggerType

    from sid.config import TRACKERS

    assert set(TRACKERS) == {str(t) for t in LoggerType} - {"all"}


def test_an_unresolvable_value_is_named_by_its_key_even_where_the_error_names_none():
    """OmegaConf's resolution errors usually carry their key; where one does not, the key is found by resolving
    each value in turn, so the error line never names '?'."""
    from sid.config import unresolvable

    cfg = OmegaConf.create({"a": {"b": [1, "${nope}"]}, "c": "${a.b}"})
    assert unresolvable(cfg) == "a.b.1"
    assert unresolvable(OmegaConf.create({"a": 1})) == "?"
