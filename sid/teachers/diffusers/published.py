"""The architectures of published pipelines, shipped as the configs of their components (a few KB each, in
``sid/assets/architectures/``, the values published with the models on the Hugging Face Hub), so that the memory plan
of a preset or a hub id is made offline and at once.

A shipped architecture is written once per process as a pipeline folder of configs alone, with stand-in tokenizers
of the real lengths (77 CLIP tokens; T5 pads to the pipeline's length): the plan builds its networks on the meta
device and reads only the shapes of the conditions. Never weights: training reads the real pipeline.
"""

from __future__ import annotations

import atexit
import functools
import importlib.resources
import json
import shutil
import tempfile
from pathlib import Path

import diffusers

ARCHITECTURES = importlib.resources.files("sid") / "assets" / "architectures"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def shipped() -> dict[str, str]:
    """Hub id -> its shipped architecture's file name."""
    return {json.loads(f.read_text())["hub_id"]: f.name for f in ARCHITECTURES.iterdir() if f.name.endswith(".json")}


def published(path: str | None) -> tuple[Path, dict] | None:
    """(folder, index) of the shipped architecture of the hub id ``path`` (without a revision, which may differ), or
    None where none is shipped."""
    name = shipped().get(path or "")
    if name is None:
        return None
    folder = written(name)
    return folder, json.loads((folder / "model_index.json").read_text())


@functools.cache
def written(name: str) -> Path:
    """The shipped architecture ``name`` as a pipeline folder of configs and stand-in tokenizers, in a temporary
    folder removed at exit."""
    import transformers  # the text encoders' configs and the tokenizers

    spec = json.loads((ARCHITECTURES / name).read_text())
    root = Path(tempfile.mkdtemp(prefix="sid-architecture-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    index = {"_class_name": spec["_class_name"]}
    for part, (cls, config) in spec["components"].items():
        if hasattr(diffusers, cls):                     # a model's or scheduler's config, as save_pretrained writes it
            index[part] = ["diffusers", cls]
            (root / part).mkdir()
            filename = "scheduler_config.json" if part == "scheduler" else "config.json"
            (root / part / filename).write_text(json.dumps({"_class_name": cls, **config}))
        else:                                            # a text encoder, and its tokenizer
            index[part] = ["transformers", cls]
            getattr(transformers, cls).config_class(**config).save_pretrained(root / part)
            tokenizer_part = "tokenizer" + part[len("text_encoder"):]
            tokenizer = stand_in_tokenizer(cls, root / f".vocab-{tokenizer_part}")
            tokenizer.save_pretrained(root / tokenizer_part)
            index[tokenizer_part] = ["transformers", type(tokenizer).__name__]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def stand_in_tokenizer(encoder: str, folder: Path):
    """A tokenizer over single letters with the real one's length: CLIP's 77, or T5's (any: the pipelines pad it
    to theirs)."""
    import transformers

    if encoder.startswith("T5"):
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("▁" + c, -1.0) for c in LETTERS)]
        return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c + "</w>": i + 2 for i, c in enumerate(LETTERS)}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
