"""The import rules of docs/architecture.md, checked on the source: who may import what, and what only the
teacher adapters know."""

import ast
from pathlib import Path

from conftest import ROOT

BASE = {"sid.config", "sid.precond", "sid.schedules", "sid.ema", "sid.errors"}
BASE_ALLOWED = {"sid.errors"}                     # base modules import nothing else from sid


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


def test_only_adapters_import_diffusers_or_pickle():
    users = {name for name, mods in SOURCES.items() if any(m.startswith("diffusers") for m in mods)}
    assert users <= {"sid.teachers.diffusers", "sid.teachers.pipeline", "sid.teachers.latent"}   # the adapter
    users = {name for name, mods in SOURCES.items() if any(m in ("pickle", "dill", "cloudpickle") for m in mods)}
    assert users <= {"sid.teachers.edm_pickle"}


def test_outside_the_adapters_teachers_are_reached_through_their_face():
    """Only ``sid.teachers`` (and the ``Teacher`` it returns) outside sid/teachers/; the teacher trainer, which
    trains a diffusers UNet, uses the diffusers adapter's own functions for it."""
    for name, mods in SOURCES.items():
        if not name.startswith("sid.teachers"):
            reached = {m for m in mods if m.startswith("sid.teachers.")}
            assert reached <= ({"sid.teachers.diffusers"} if name == "sid.teacher_training" else set()), name


def test_the_library_never_imports_the_command_line():
    for name, mods in SOURCES.items():
        if not name.startswith(("sid.commands", "sid.cli", "sid.__main__")):
            assert not any(m.startswith(("sid.commands", "sid.cli", "eval")) for m in mods), name


def test_timesteps_prediction_types_and_model_configs_stay_in_the_adapters():
    for path in (ROOT / "sid").rglob("*.py"):
        if "teachers" not in path.parts and path.name != "config.py":    # the schema names the adapter's keys
            text = path.read_text()
            for word in ("prediction_type", "alphas_cumprod", "unet.config", "from_pretrained", "hasattr("):
                assert word not in text, (path, word)
