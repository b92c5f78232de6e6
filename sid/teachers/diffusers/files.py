"""Reading diffusers folders: JSON configs, the shipped teachers, hub ids, and the components a pipeline's index
names, each by its own class from diffusers or transformers only (weights as safetensors, or torch files read
weights-only, as those libraries do). A component that names code of its own (``auto_map``: a transformers ``Auto``
class on a model type it does not know) is read only with ``trust_code``, which transformers is always told
(``trust_remote_code``), so it never asks on stdin."""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from pathlib import Path

import diffusers

from sid.errors import SidError, described
from sid.teachers.base import on_meta

ASSETS = Path(__file__).resolve().parents[2] / "assets"          # teachers shipped inside the package
BUILTIN = "builtin:"                                               # teacher.diffusers.path=builtin:<name>
VAES = ("AutoencoderKL", "AutoencoderDC")                          # the VAE classes a latent folder may name


def builtin_teachers() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "unet" / "config.json").is_file()) if ASSETS.is_dir() else []


def names_a_teacher(path: str) -> bool:
    """Whether ``path`` alone names a teacher of this adapter, with no config: ``builtin:<name>`` or a folder."""
    return path.startswith(BUILTIN) or Path(path).is_dir()


def resolve_path(path: str) -> str:
    """``builtin:<name>`` -> the shipped folder ``sid/assets/<name>``; any other path unchanged."""
    if not path.startswith(BUILTIN):
        return path
    name = path[len(BUILTIN):]
    if name not in builtin_teachers():
        raise SidError(f"no built-in teacher {name!r}; the package ships: {', '.join(builtin_teachers()) or 'none'}")
    return str(ASSETS / name)


def is_hub_id(path: str) -> bool:
    """``owner/name[@revision]`` that is not a local path (``runs/mine`` with ``runs/`` here: a mistyped folder)."""
    return not (path.startswith((".", "/", "~")) or path.partition("@")[0].count("/") != 1
                or Path(path.split("/")[0]).is_dir())


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (offline mode, or no answer to one request), asked once per process
    and without retries: huggingface_hub's own client retries each file for half a minute before it gives up, and
    diffusers then reports the file as missing. None where the hub answers."""
    import huggingface_hub  # online use only
    from huggingface_hub.utils import get_session

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "offline mode: HF_HUB_OFFLINE is set"
    try:
        get_session().head(huggingface_hub.constants.ENDPOINT, timeout=5)
    except Exception as e:               # the client's connection errors come in many types: all mean no answer
        return described(e)
    return None


@contextlib.contextmanager
def hub_calls():
    """Calls into diffusers' hub loading, without the deprecation warning its own (deprecated) arguments raise in
    huggingface_hub on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


def read_json(path: Path) -> dict | None:
    """A JSON config, or None where the file is not there; one line where it is not valid JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SidError(f"{path} is not valid JSON ({e}); restore it from the model's source") from None


def export_dir(path) -> Path:
    """The export folder ``path`` names: the export itself, its run folder (then its ``generator/``), or a file in
    it."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    own = (folder / "model_index.json").is_file() or (folder / "generator.json").is_file()
    return folder if own else folder / "generator"


def held(index: dict, name: str) -> bool:
    """Whether a pipeline's index holds the component ``name`` (not absent, not [null, null])."""
    return (index.get(name) or [None])[0] is not None


@contextlib.contextmanager
def quiet():
    """transformers' progress bars off while components load or save: one bar per component is noise in a log."""
    try:
        import transformers  # optional: pixel-space pipelines need no transformers
    except ImportError:
        yield
        return
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()


def read_model(cls, folder: Path, meta: bool = False):
    """A diffusers model from its folder: its weights, or (``meta``) its config alone, on the meta device."""
    if not meta:
        return cls.from_pretrained(folder)
    config = cls.load_config(folder)
    return on_meta(lambda: cls.from_config(config))


def names_code(folder: Path) -> bool:
    """Whether a component folder asks for code of its own: an ``auto_map`` in its model, tokenizer or processor
    config (transformers then imports the ``.py`` files beside them)."""
    configs = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
    return any("auto_map" in (read_json(folder / config) or {}) for config in configs)


def read_component(root: Path, name: str, index: dict, meta: bool = False, trust_code: bool = False):
    """A VAE (diffusers), text encoder or tokenizer (transformers) by the class its index names, from those
    libraries only, and code of the folder's own only with ``trust_code``; ``meta``: a network from its config
    alone, on the meta device."""
    library, cls = (index.get(name) or [None, None])[:2]
    if name == "vae":
        if library != "diffusers" or cls not in VAES:
            raise SidError(f"{root}: its vae is {library}.{cls}; supported: {', '.join(VAES)}")
        return read_model(getattr(diffusers, cls), root / name, meta)
    import transformers  # optional: text families only

    model = getattr(transformers, cls or "", None) if library == "transformers" else None
    if model is None:
        raise SidError(f"{root}: its {name} is {library}.{cls}; a transformers text encoder and tokenizer are "
                       "needed")
    if names_code(root / name) and not trust_code:
        raise SidError(f"{root}: its {name} names code of its own (auto_map in its config), which would run as it "
                       "loads: pass --trust-code (trust_code=True in Python) for a folder you trust")
    if not meta or not (isinstance(model, type) and issubclass(model, transformers.PreTrainedModel)):
        return model.from_pretrained(root / name, trust_remote_code=trust_code)    # a tokenizer: always read
    config = model.config_class.from_pretrained(root / name, trust_remote_code=trust_code)
    return on_meta(lambda: model(config))


def load_clip(model: str):
    """(``CLIPModel``, ``CLIPProcessor``) from a folder (or a hub id, online), weights and configs only: the CLIP
    score's model (``sid.metrics.make_clip``)."""
    import transformers  # optional: the CLIP score only

    with quiet():                        # CLIP's own classes: no code of the folder's, and none asked for
        return (transformers.CLIPModel.from_pretrained(model, trust_remote_code=False).eval(),
                transformers.CLIPProcessor.from_pretrained(model, trust_remote_code=False))
