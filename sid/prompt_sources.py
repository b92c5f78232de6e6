"""Prompt lists of any size, read by index and never held in memory: what ``conditions.prompts`` names.

Each source is a sequence of prompts (``len``, ``source[i]``, iteration) that keeps only where each prompt starts
(8 bytes a prompt for files, a row number for Parquet), so a list of millions of captions costs megabytes, and a
shuffled draw (``sid.data.Shuffled``) reads just the prompts it draws. Every source is checked in one pass when it
is opened, so a bad line is one error line before training starts, not a failure hours in.

* a text file, one prompt per line (blank lines skipped);
* ``.jsonl``: one object per line, the prompt under ``conditions.prompt_key`` (null: ``prompt``, ``text`` or
  ``caption``, the first present);
* ``.parquet``: the column ``conditions.prompt_key`` (null: the first of ``prompt``, ``text``, ``caption``); needs
  pyarrow (``pip install sid-distill[parquet]``);
* WebDataset shards, ``.tar`` (a file or a glob such as ``captions-*.tar``): the member of each sample whose
  extension is ``conditions.prompt_key`` (null: ``txt``), in the shards' order.
"""

from __future__ import annotations

import glob
import json
import tarfile
from array import array
from collections.abc import Sequence
from pathlib import Path

from sid.errors import SidError, described

KEYS = ("prompt", "text", "caption")


class PromptSequence(Sequence):
    """A sequence of prompts read one at a time (``read(i)``): indices and slices, as a list takes them."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.read(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.read(i % len(self))


class LineFile(PromptSequence):
    """A text or JSONL file's prompts by the byte offset of their lines."""

    def __init__(self, path: Path, key: str | None = None):
        self.path, self.jsonl, self.key = path, path.suffix == ".jsonl", key
        self.offsets = array("q")
        try:
            with open(path, "rb") as f:
                offset = 0
                for number, line in enumerate(f, 1):
                    if line.strip():
                        if self.jsonl:
                            self.prompt(line, number)            # checked once, here
                        self.offsets.append(offset)
                    offset += len(line)
        except (OSError, UnicodeDecodeError) as e:
            raise SidError(f"cannot read the prompts file {path} ({type(e).__name__}); give a UTF-8 text file, one "
                           "prompt per line (or .jsonl)") from None

    def prompt(self, line: bytes, number: int | str = "?") -> str:
        text = line.decode("utf-8").strip()
        if not self.jsonl:
            return text
        try:
            record = json.loads(text)
            keys = (self.key,) if self.key else KEYS
            return next(str(record[k]) for k in keys if k in record)
        except (json.JSONDecodeError, TypeError, StopIteration, UnicodeDecodeError):
            field = f"a {self.key!r} field" if self.key else "a prompt, text or caption field"
            raise SidError(f"{self.path}:{number} is not a JSON object with {field}; fix that line") from None

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            return self.prompt(f.readline())


class ParquetColumn(PromptSequence):
    """A Parquet file's prompt column, read a row group at a time (the last one kept)."""

    def __init__(self, path: Path, key: str | None = None):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SidError(f"{path}: reading Parquet needs pyarrow; pip install sid-distill[parquet]") from None
        try:
            self.file = pq.ParquetFile(path)
        except (OSError, ValueError) as e:
            raise SidError(f"{path} is not a readable Parquet file ({described(e, 80)})") from None
        names = self.file.schema_arrow.names
        self.key = (key if key in names else None) if key else next((k for k in KEYS if k in names), None)
        if self.key is None:
            wanted = repr(key) if key else "prompt, text or caption"
            raise SidError(f"{path} has no column {wanted} (its columns: {', '.join(names)}); set "
                           "conditions.prompt_key")
        counts = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = array("q", [0])
        for n in counts:
            self.starts.append(self.starts[-1] + n)
        self.group = (-1, None)

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, i: int) -> str:
        g = next(g for g in range(len(self.starts) - 1) if i < self.starts[g + 1])
        if self.group[0] != g:
            self.group = (g, self.file.read_row_group(g, columns=[self.key]).column(0).to_pylist())
        return str(self.group[1][i - self.starts[g]])


class TarCaptions(PromptSequence):
    """WebDataset shards' captions: the members whose extension is the key, by (shard, offset, size)."""

    def __init__(self, shards: list[Path], key: str | None = None):
        self.shards, self.extension = shards, "." + (key or "txt")
        self.where = array("q")                                  # shard index, data offset, size; per caption
        for s, shard in enumerate(shards):
            try:
                with tarfile.open(shard) as tar:
                    for member in tar:
                        if member.isfile() and member.name.endswith(self.extension):
                            self.where.extend((s, member.offset_data, member.size))
            except (OSError, tarfile.TarError) as e:
                raise SidError(f"{shard} is not a readable tar shard ({described(e, 80)})") from None
        if not self.where:
            raise SidError(f"the shards {shards[0]}... hold no *{self.extension} captions; set conditions.prompt_key "
                           "to their extension")

    def __len__(self) -> int:
        return len(self.where) // 3

    def read(self, i: int) -> str:
        s, offset, size = self.where[3 * i:3 * i + 3]
        with open(self.shards[s], "rb") as f:
            f.seek(offset)
            return f.read(size).decode("utf-8", errors="replace").strip()


def read_prompts(path: str | Path, key: str | None = None) -> Sequence:
    """The prompts of ``path`` (text, .jsonl, .parquet, or .tar shards: a file or a glob) as a sequence read on
    demand; one error line for a missing, unreadable or empty source."""
    text = str(path)
    if text.endswith(".tar") and any(c in text for c in "*?["):
        shards = [Path(p) for p in sorted(glob.glob(text))]
        if not shards:
            raise SidError(f"no shards match {text}")
        prompts = TarCaptions(shards, key)
    else:
        path = Path(path)
        if not path.is_file():
            raise SidError(f"cannot read the prompts file {path} (not found); give a text file (one prompt per "
                           "line), .jsonl, .parquet or .tar shards")
        kind = {".parquet": ParquetColumn, ".tar": lambda p, k: TarCaptions([p], k)}.get(path.suffix, LineFile)
        prompts = kind(path, key)
    if not len(prompts):
        raise SidError(f"the prompts file {path} holds no prompts; give one prompt per line")
    return prompts
