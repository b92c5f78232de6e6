"""Data-free conditions (sid/conditions.py): prompt files, the shuffled resumable prompt stream, class labels
and the embeddings cache."""

import pytest
import torch

from sid.conditions import ClassLabels, Prompts, load_cache
from sid.errors import SidError
from sid.prompt_sources import read_prompts


def fake_encode(prompts):
    """A stand-in text encoder: each prompt's letters as numbers (deterministic, prompt-specific)."""
    return {"text": torch.tensor([[float(ord(c)) for c in p.ljust(12)[:12]] for p in prompts])}


PROMPTS = [f"prompt {i}" for i in range(7)]


def test_prompts_are_read_from_text_and_jsonl_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n{"caption": "a dog", "id": 3}\n{"text": "a fox"}\n')
    assert list(read_prompts(tmp_path / "p.txt")) == ["a cat", "a dog"]
    assert list(read_prompts(tmp_path / "p.jsonl")) == ["a cat", "a dog", "a fox"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "cannot read the prompts file"),
    ("empty.txt", "\n   \n", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "a"}\n{"label": 3}\n', r"bad.jsonl:2 is not a JSON object with a prompt"),
    ("worse.jsonl", "not json\n", r"worse.jsonl:1 is not a JSON object"),
])
def test_bad_prompt_files_are_one_line(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(SidError, match=message):
        read_prompts(tmp_path / name)


def test_every_pass_draws_every_prompt_once_in_a_new_order():
    source = Prompts(PROMPTS, fake_encode, seed=3)
    passes = [source.stream.indices(7), source.stream.indices(7)]
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(7)) and passes[0] != passes[1]
    assert Prompts(PROMPTS, fake_encode, seed=3).stream.indices(14) == passes[0] + passes[1]   # the seed's
    assert Prompts(PROMPTS, fake_encode, seed=4).stream.indices(7) != passes[0]


def test_processes_take_their_slices_of_one_stream_and_a_restored_position_continues_it():
    whole = Prompts(PROMPTS, fake_encode, seed=0)
    stream = [whole.stream.indices(6) for _ in range(3)]                     # one process, micro-batches of 6
    ranks = [Prompts(PROMPTS, fake_encode, seed=0, rank=r, world=2) for r in range(2)]
    for draw in stream:                                               # two processes, 3 each
        assert ranks[0].stream.indices(3) + ranks[1].stream.indices(3) == draw
    assert ranks[0].state_dict() == ranks[1].state_dict() == whole.state_dict() == {"drawn": 18}
    resumed = Prompts(PROMPTS, fake_encode, seed=0)                   # resumed on one process
    resumed.load_state_dict(ranks[1].state_dict())
    assert resumed.stream.indices(5) == whole.stream.indices(5)


def test_drawn_and_fixed_conditions_are_the_prompts_encodings():
    source = Prompts(PROMPTS, fake_encode, seed=1)
    order = Prompts(PROMPTS, fake_encode, seed=1).stream.indices(3)
    torch.testing.assert_close(source.draw(3)["text"], fake_encode([PROMPTS[i] for i in order])["text"])
    torch.testing.assert_close(source.fixed(9)["text"], fake_encode([PROMPTS[i % 7] for i in range(9)])["text"])
    assert source.grid_prompts(2) == PROMPTS[:2]


def test_class_labels_are_uniform_as_before_or_follow_the_given_probabilities():
    torch.manual_seed(5)
    drawn = ClassLabels(10).draw(6)
    torch.manual_seed(5)
    assert drawn.argmax(1).tolist() == torch.randint(10, (6,)).tolist()   # the draws the trainer always made
    torch.manual_seed(0)
    counts = ClassLabels(3, [1, 0, 3]).draw(40_000).sum(0) / 40_000
    torch.testing.assert_close(counts, torch.tensor([0.25, 0.0, 0.75]), atol=0.01, rtol=0)
    assert ClassLabels(3).fixed(4).argmax(1).tolist() == [0, 1, 2, 0]
    with pytest.raises(SidError, match="conditions.class_probs has 2 values for a teacher of 3 classes"):
        ClassLabels(3, [0.5, 0.5])


def test_the_cache_is_made_once_then_read_and_refused_for_another_encoder_or_other_prompts(tmp_path):
    path = tmp_path / "cache" / "emb.safetensors"
    made = load_cache(path, PROMPTS, fake_encode, encoder="clip-a")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    torch.testing.assert_close(made["text"], fake_encode(PROMPTS)["text"])

    def no_encoder(prompts):
        raise AssertionError("a cache that exists is read, not encoded again")

    read = load_cache(path, PROMPTS, no_encoder, encoder="clip-a")
    assert torch.equal(read["text"], made["text"])
    source = Prompts(PROMPTS, no_encoder, seed=2, cache=read)
    torch.testing.assert_close(source.draw(4)["text"], Prompts(PROMPTS, fake_encode, seed=2).draw(4)["text"])
    with pytest.raises(SidError, match="was made with another text encoder than this teacher's; delete it"):
        load_cache(path, PROMPTS, fake_encode, encoder="clip-b")
    with pytest.raises(SidError, match="was made for other prompts than conditions.prompts"):
        load_cache(path, PROMPTS[:3], fake_encode, encoder="clip-a")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(SidError, match="is not a readable embeddings cache"):
        load_cache(path, PROMPTS, fake_encode, encoder="clip-a")


def test_settings_a_teacher_cannot_use_are_one_line():
    from types import SimpleNamespace

    from sid.conditions import build_conditions
    from sid.config import load_config

    text = SimpleNamespace(text_to_image=True, label_dim=0, spec={"kind": "diffusers"})
    pixel = SimpleNamespace(text_to_image=False, label_dim=0, spec={"kind": "diffusers"})
    for teacher, overrides, message in (
            (text, ["conditions.class_probs=[1, 2]"], "class_probs is for class-conditional teachers; this one is "
                                                      "text-to-image"),
            (text, [], "a text-to-image teacher is distilled from prompts: set conditions.prompts=FILE"),
            (pixel, ["conditions.prompts=p.txt"], "conditions.prompts and conditions.cache are for text-to-image"),
            (pixel, ["conditions.class_probs=[1]"], "class_probs is for class-conditional teachers, and this one is "
                                                    "unconditional")):
        with pytest.raises(SidError, match=message):
            build_conditions(load_config([], overrides), teacher)
