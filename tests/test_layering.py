"""Import rules of ARCHITECTURE.md, checked on the source: who may import what."""

import ast
from pathlib import Path

from conftest import ROOT

BASE = {"sid.config", "sid.precond", "sid.schedules", "sid.ema", "sid.errors"}
# base modules may import only these sid modules (config validates λ names through the loss presets)
BASE_ALLOWED = {"sid.errors", "sid.losses"}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): imports(p) for p in (ROOT / "sid").rglob("*.py")}


def test_base_modules_import_almost_nothing_from_sid():
    for name in BASE:
        assert {m for m in SOURCES[name] if m.startswith("sid")} <= BASE_ALLOWED, name


def test_only_the_trainer_uses_accelerate():
    users = {name for name, mods in SOURCES.items() if any(m.startswith("accelerate") for m in mods)}
    assert users <= {"sid.trainer", "sid.teacher_training"}


def test_only_adapters_import_diffusers():
    users = {name for name, mods in SOURCES.items() if any(m.startswith("diffusers") for m in mods)}
    assert users <= {"sid.teachers.diffusers_unet"}


def test_the_library_never_imports_the_command_line():
    for name, mods in SOURCES.items():
        if not name.startswith(("sid.commands", "sid.cli", "sid.__main__")):
            assert not any(m.startswith(("sid.commands", "sid.cli", "eval")) for m in mods), name


def test_timesteps_and_prediction_types_stay_in_the_adapters():
    for path in (ROOT / "sid").rglob("*.py"):
        if "teachers" not in path.parts and path.name != "config.py":    # the schema names the adapter's keys
            text = path.read_text()
            assert "prediction_type" not in text and "alphas_cumprod" not in text, path
