"""The repository's layout: the top level the project names, a top-level train.py, presets that travel with the
package and are found from a clone that was never installed."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, sid_process

TOP_LEVEL = ("sid", "configs", "train.py", "eval", "tests", "README.md")


def test_the_top_level_is_the_one_the_project_names():
    assert all((ROOT / entry).exists() for entry in TOP_LEVEL)
    assert (ROOT / "configs" / "__init__.py").is_file()               # a package, not a namespace, once installed
    assert not (ROOT / "sid" / "configs").exists()                     # one copy of the presets


@pytest.mark.slow
def test_train_py_is_sid_train_from_anywhere(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    out = run("--help")
    assert out.returncode == 0 and "--config" in out.stdout and "--resume" in out.stdout
    out = run("--config", "toy_2d", "loss.lam=0.75", "--dry-run")    # a preset by name, outside the clone
    assert out.returncode == 0 and "lam: '0.75'" in out.stdout
    out = run("loss.lamb=1")
    assert out.returncode == 2 and out.stderr.startswith("error: unknown config key 'loss.lamb'")
    assert sid_process("train", "--config", "toy_2d", "--dry-run", cwd=tmp_path).returncode == 0


def test_a_clone_used_without_installing_finds_the_presets(monkeypatch):
    import importlib.resources

    import sid.config

    def not_installed(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", not_installed)
    assert sid.config.presets_folder() == ROOT / "configs"


@pytest.mark.slow
def test_the_wheel_of_a_clean_clone_ships_every_preset_and_the_shipped_teacher(tmp_path):
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(clone)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"sid/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    teacher = {f"sid/{p.relative_to(ROOT / 'sid').as_posix()}" for p in (ROOT / "sid" / "assets").rglob("*")
               if p.is_file()}
    assert len(presets) >= 6 and presets <= names, sorted(presets - names)
    assert "sid/assets/fmnist/unet/diffusion_pytorch_model.safetensors" in teacher and teacher <= names
    assert "sid/configs/__init__.py" in names and not [n for n in names if n.startswith(("tests/", "eval/"))]
