"""The import rules of docs/architecture.md, checked on the source: who may import what, that no import (at the top
of a module or inside a function) closes a cycle, and what only the teacher adapters know."""

import ast
from pathlib import Path

from conftest import ROOT

BASE = {"sid.config", "sid.schema", "sid.precond", "sid.schedules", "sid.ema", "sid.errors"}
BASE_ALLOWED = {"sid.errors", "sid.schema"}       # base modules import nothing else from sid
WING = "sid.teachers.diffusers"                   # the diffusers adapter: a package of rooms behind its face


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module an import statement of the file names, wherever the statement stands; ``from a import b`` names
    ``a`` and, where it is a module, ``a.b``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                            # relative: from the file's package
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names |= {base, *(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)}
    return names


MODULES = {module_name(p) for p in (ROOT / "sid").rglob("*.py")}
SOURCES = {module_name(p): imports(p) for p in (ROOT / "sid").rglob("*.py")}
GRAPH = {name: {m for m in mods if m in MODULES and m != name} for name, mods in SOURCES.items()}


def cycle(graph: dict) -> list[str] | None:
    """One cycle of the graph (its modules in order), or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_closes_a_cycle():
    """Function-level imports count: one that only dodged a cycle would show here."""
    assert cycle(GRAPH) is None


def test_base_modules_import_almost_nothing_from_sid():
    for name in BASE:
        assert {m for m in SOURCES[name] if m.startswith("sid")} <= BASE_ALLOWED, name


def test_only_the_trainer_uses_accelerate():
    users = {name for name, mods in SOURCES.items() if any(m.startswith("accelerate") for m in mods)}
    assert users <= {"sid.trainer", "sid.run", "sid.maintenance", "sid.teacher_training"}


def test_only_the_adapters_import_diffusers_transformers_or_pickle():
    for library in ("diffusers", "transformers"):
        users = {name for name, mods in SOURCES.items() if any(m.startswith(library) for m in mods)}
        assert all(name.startswith(WING) for name in users), (library, users)
    users = {name for name, mods in SOURCES.items() if any(m in ("pickle", "dill", "cloudpickle") for m in mods)}
    assert users <= {"sid.teachers.edm_pickle"}


def test_outside_the_adapters_teachers_are_reached_through_their_face():
    """Only ``sid.teachers`` (and the ``Teacher`` it returns) outside sid/teachers/, and the diffusers wing's own
    face (the teacher trainer's UNet, exports' VAEs, the CLIP score's model), never its rooms."""
    for name, mods in SOURCES.items():
        if not name.startswith("sid.teachers"):
            reached = {m for m in mods if m.startswith("sid.teachers.")}
            assert reached <= {WING}, name


def test_a_family_module_knows_only_what_families_build_on():
    """A family module (``families/``) builds on the wing's shared rooms (its row, codecs, errors) and on another
    family's backbone, never on the rooms that read folders, load teachers or export."""
    allowed = {f"{WING}.family", f"{WING}.codecs", "sid.errors", "sid.precond"}
    for name, mods in GRAPH.items():
        if name.startswith(f"{WING}.families."):
            assert {m for m in mods if m.startswith("sid")} <= allowed | {m for m in MODULES
                                                                         if m.startswith(f"{WING}.families.")}, name


def test_the_library_never_imports_the_command_line():
    for name, mods in SOURCES.items():
        if not name.startswith(("sid.commands", "sid.cli", "sid.__main__")):
            assert not any(m.startswith(("sid.commands", "sid.cli", "eval")) for m in mods), name


def test_rooms_stay_small():
    """A module past 550 lines has become two rooms (docs/architecture.md)."""
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in (ROOT / "sid").rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 550} == {}


def test_timesteps_prediction_types_and_model_configs_stay_in_the_adapters():
    for path in (ROOT / "sid").rglob("*.py"):
        if "teachers" not in path.parts and path.name not in ("schema.py", "config.py"):  # the schema's keys
            text = path.read_text()
            for word in ("prediction_type", "alphas_cumprod", "unet.config", "from_pretrained", "hasattr("):
                assert word not in text, (path, word)
