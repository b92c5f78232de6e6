"""Prompt lists of any size (sid/prompt_sources.py): text, JSONL with a key, a Parquet column and WebDataset
shards, read by index; a million lines indexed in bounded memory and drawn as the prompts stream draws them."""

import io
import json
import tarfile
import tracemalloc

import pytest

from sid.conditions import Prompts
from sid.errors import SidError
from sid.prompt_sources import read_prompts


def shard(path, captions, extension="txt"):
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            for ext, data in ((extension, caption.encode()), ("jpg", b"\xff\xd8 not read")):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_jsonl_keys_parquet_columns_and_webdataset_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"id": i, "alt": f"alt {i}"}) for i in range(3)))
    assert list(read_prompts(tmp_path / "p.jsonl", key="alt")) == ["alt 0", "alt 1", "alt 2"]
    with pytest.raises(SidError, match=r"p.jsonl:1 is not a JSON object with a 'alt2' field"):
        read_prompts(tmp_path / "p.jsonl", key="alt2")

    pq.write_table(pa.table({"url": ["u"] * 5, "caption": [f"c {i}" for i in range(5)]}), tmp_path / "p.parquet",
                   row_group_size=2)
    column = read_prompts(tmp_path / "p.parquet")
    assert len(column) == 5 and [column[i] for i in (4, 0, 3, 1, 2)] == ["c 4", "c 0", "c 3", "c 1", "c 2"]
    with pytest.raises(SidError, match="has no column 'text'.*its columns: url, caption"):
        read_prompts(tmp_path / "p.parquet", key="text")

    shard(tmp_path / "s-000.tar", ["a cat", "a dog"])
    shard(tmp_path / "s-001.tar", ["a fox"])
    assert list(read_prompts(str(tmp_path / "s-*.tar"))) == ["a cat", "a dog", "a fox"]
    with pytest.raises(SidError, match=r"hold no \*.caption captions"):
        read_prompts(tmp_path / "s-000.tar", key="caption")


def test_a_million_prompts_stream_in_bounded_memory(tmp_path):
    """1,000,000 lines (about 19 MB): the index holds 8 bytes a prompt (tracemalloc's peak while indexing stays
    below 12 MB, where the lines as Python strings would take some 70 MB), and the shuffled stream draws line i as
    prompt i."""
    path = tmp_path / "million.txt"
    with open(path, "w") as f:
        f.writelines(f"prompt number {i}\n" for i in range(1_000_000))
    tracemalloc.start()
    prompts = read_prompts(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(prompts) == 1_000_000 and peak < 12 * 2**20
    drawn = []
    source = Prompts(prompts, lambda batch: drawn.extend(batch) or {}, seed=0)
    source.draw(64)
    assert [int(p.rsplit(" ", 1)[1]) for p in drawn] == source.stream.order(0)[:64].tolist()


def test_a_source_reads_indices_slices_and_negative_indices_as_a_list(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\n\nc\nd\n")
    prompts = read_prompts(tmp_path / "p.txt")
    assert prompts[1:3] == ["b", "c"] and prompts[-1] == "d" and prompts[::2] == ["a", "c"]
    with pytest.raises(IndexError):
        prompts[4]
