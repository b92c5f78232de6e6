"""Data-free conditions: what the generator is asked for at each draw, since no images are used to train.

A ``Conditions`` source gives ``draw(n, device)``, a batch of conditions of the denoiser contract (``None``,
one-hot class labels, or a teacher family's encoded prompts), ``fixed(n)``, the same ``n`` conditions every time,
and what the trainer asks of it: ``grid(n)`` (the conditions of a sample grid, where the seeds do not draw their
own), ``grid_prompts(n)`` and ``describe()``. Sources with a position (prompts) put it in the training state, so a
resumed run continues where it stopped, on any number of processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sid.checkpoint import read_cache, write_cache
from sid.data import Shuffled
from sid.errors import SidError
from sid.prompt_sources import read_prompts


class Unconditional:
    """An unconditional teacher: every condition is None."""

    def draw(self, n: int, device=None):
        return None

    def fixed(self, n: int, device=None):
        return None

    def grid(self, n: int, device=None):
        """The conditions of a sample grid's ``n`` images, or None where each seed draws its own (class labels: from
        the seed, as ``sid sample`` draws them, so the teacher's grid at the same seeds has the same ones)."""
        return None

    def grid_prompts(self, n: int) -> list[str] | None:
        """The prompts of a sample grid's images, where they have prompts."""
        return None

    def describe(self) -> str:
        """Where the conditions come from, for the run's first line ("" where there is nothing to say)."""
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        pass


class ClassLabels(Unconditional):
    """One-hot class labels, drawn uniformly or from ``probs`` (one probability per class), on the device from the
    global generator (the trainer reseeds it every step)."""

    def __init__(self, label_dim: int, probs=None):
        self.label_dim = label_dim
        self.probs = None
        if probs:
            if len(probs) != label_dim:
                raise SidError(f"conditions.class_probs has {len(probs)} values for a teacher of {label_dim} classes: "
                               "give one per class, or none for uniform")
            self.probs = torch.tensor([float(p) for p in probs], dtype=torch.float64)
            self.probs /= self.probs.sum()

    def draw(self, n: int, device=None) -> torch.Tensor:
        if self.probs is None:
            classes = torch.randint(self.label_dim, (n,), device=device)
        else:
            classes = torch.multinomial(self.probs.to(device), n, replacement=True)
        return nn.functional.one_hot(classes, self.label_dim).float()

    def fixed(self, n: int, device=None) -> torch.Tensor:
        """Classes 0, 1, ..., in turn."""
        return nn.functional.one_hot(torch.arange(n, device=device) % self.label_dim, self.label_dim).float()


class Prompts(Unconditional):
    """Prompts from a sequence (a list, or a file read on demand: ``sid.prompt_sources``), in a shuffled order that
    is new every pass, encoded by the teacher's own encoders.

    The order and the position are a ``Shuffled`` stream's (``sid/data.py``): a function of (seed, pass), resumed
    on any number of processes. ``encode`` turns a list of prompts into a condition; with a ``cache`` (a dict of
    every prompt's condition, see ``encode_all``) the encoder is not run while training.
    """

    def __init__(self, prompts: Sequence[str], encode: Callable[[list[str]], dict], seed: int = 0, rank: int = 0,
                 world: int = 1, cache: dict | None = None):
        self.prompts, self.encode, self.cache = prompts, encode, cache
        self.stream = Shuffled(len(prompts), seed, rank, world, salt="prompts")

    @property
    def drawn(self) -> int:
        return self.stream.drawn

    def condition(self, indices: list[int], device=None) -> dict:
        if self.cache is not None:
            cond = {k: v[indices] for k, v in self.cache.items()}
        else:
            cond = self.encode([self.prompts[i] for i in indices])
        return {k: v.to(device) for k, v in cond.items()}

    def draw(self, n: int, device=None) -> dict:
        return self.condition(self.stream.indices(n), device)

    def fixed(self, n: int, device=None) -> dict:
        """The first ``n`` prompts of the list, in its order (cycled when it is shorter)."""
        return self.condition([i % len(self.prompts) for i in range(n)], device)

    def grid(self, n: int, device=None) -> dict:
        return self.fixed(n, device)

    def grid_prompts(self, n: int) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    def describe(self) -> str:
        return f" from {len(self.prompts):,} prompts{' (embeddings cached)' if self.cache is not None else ''}"

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.stream.load_state_dict(state)


def encode_all(prompts: list[str], encode: Callable[[list[str]], dict], batch: int = 64) -> dict:
    """Every prompt's condition, on the CPU, stacked in the list's order."""
    parts = [encode(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
    return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}


def load_cache(path: str | Path, prompts: list[str], encode: Callable[[list[str]], dict], encoder: str) -> dict:
    """The embeddings cache at ``path``: read when it was made for these prompts by this ``encoder`` (a
    fingerprint of the teacher's text encoder), else one error line; made and written (atomically) when the file
    does not exist yet."""
    path, made_for = Path(path), {"prompts_sha256": text_digest(prompts), "encoder": encoder}
    if path.is_file():
        cache, metadata = read_cache(path, "conditions.cache", "embeddings cache")
        if metadata.get("encoder") != encoder:
            raise SidError(f"conditions.cache={path} was made with another text encoder than this teacher's; "
                           "delete it (it is made again) or name another file")
        if metadata.get("prompts_sha256") != made_for["prompts_sha256"]:
            raise SidError(f"conditions.cache={path} was made for other prompts than conditions.prompts; delete it "
                           "(it is made again) or name another file")
        return cache
    cache = encode_all(prompts, encode)
    write_cache(path, cache, made_for, "conditions.cache", "embeddings cache", "to encode prompts as they are drawn")
    return cache


def text_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def build_conditions(cfg, teacher, rank: int = 0, world: int = 1):
    """The source of ``cfg.conditions`` for this teacher: prompts for a text-to-image teacher (required),
    class labels for a class-conditional one, none otherwise; a setting the teacher cannot use is one line."""
    section = cfg.conditions
    if teacher.text_to_image:
        if section.class_probs:
            raise SidError("conditions.class_probs is for class-conditional teachers; this one is text-to-image: "
                           "leave it empty and give conditions.prompts")
        if not section.prompts:
            raise SidError("a text-to-image teacher is distilled from prompts: set conditions.prompts=FILE (one "
                           "prompt per line, or .jsonl)")
        prompts = read_prompts(section.prompts, section.prompt_key)
        cache = None
        if section.cache:
            cache = load_cache(section.cache, prompts, teacher.encode, teacher.encoder_fingerprint())
        return Prompts(prompts, teacher.encode, cfg.train.seed, rank, world, cache)
    if section.prompts or section.cache:
        raise SidError(f"conditions.prompts and conditions.cache are for text-to-image teachers; this "
                       f"{teacher.spec['kind']} teacher takes {'class labels' if teacher.label_dim else 'none'}: "
                       "leave them null")
    if teacher.label_dim:
        return ClassLabels(teacher.label_dim, list(section.class_probs))
    if section.class_probs:
        raise SidError("conditions.class_probs is for class-conditional teachers, and this one is unconditional: "
                       "leave it empty")
    return Unconditional()
