"""EventTail: following an events.jsonl that is still being written, truncated, replaced or garbage."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from tui.events import MAX_LINE_BYTES, EventTail, read_all


def line(stage: str = "select", kind: str = "progress", ts: float = 100.0, **figures) -> bytes:
    return orjson.dumps({"ts": ts, "stage": stage, "kind": kind, **figures}) + b"\n"


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as file:
        file.write(data)


def test_reads_only_what_was_added_since_the_last_read(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(fraction=0.1) + line(fraction=0.2))
    tail = EventTail(path)
    assert [e.data["fraction"] for e in tail.read().events] == [0.1, 0.2]
    assert tail.read().events == []
    append(path, line(fraction=0.3))
    batch = tail.read()
    assert [e.data["fraction"] for e in batch.events] == [0.3]
    assert not batch.restarted


def test_half_written_last_line_is_held_until_its_newline_arrives(tmp_path):
    path = tmp_path / "events.jsonl"
    whole = line(fraction=0.5, docs_seen=48000)
    path.write_bytes(line(fraction=0.4) + whole[:17])
    tail = EventTail(path)
    batch = tail.read()
    assert [e.data["fraction"] for e in batch.events] == [0.4]
    assert batch.bad_lines == 0  # half a line is not a bad line, just an early one

    append(path, whole[17:])
    batch = tail.read()
    assert [(e.data["fraction"], e.data["docs_seen"]) for e in batch.events] == [(0.5, 48000)]
    assert batch.bad_lines == 0


def test_truncated_then_rewritten_file_restarts_from_its_first_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(ts=1.0, fraction=0.1) + line(ts=2.0, fraction=0.2) + line(ts=3.0, fraction=0.3))
    tail = EventTail(path)
    assert len(tail.read().events) == 3

    with open(path, "r+b") as file:  # truncate in place: same inode, shorter
        file.truncate(0)
    append(path, line(ts=50.0, stage="pretrain", kind="step", step=1, total_steps=10))
    batch = tail.read()
    assert batch.restarted
    assert [(e.stage, e.ts) for e in batch.events] == [("pretrain", 50.0)]


def test_rewrite_in_place_that_is_not_shorter_is_noticed_by_its_first_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(ts=1.0, fraction=0.1))
    tail = EventTail(path)
    assert len(tail.read().events) == 1

    with open(path, "r+b") as file:  # same inode, rewritten from the start and longer than before
        file.write(line(ts=9.0, fraction=0.7) + line(ts=9.5, fraction=0.8))
    batch = tail.read()
    assert batch.restarted
    assert [e.ts for e in batch.events] == [9.0, 9.5]


def test_replaced_file_new_inode_restarts(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(line(ts=1.0) + line(ts=2.0))
    tail = EventTail(path)
    assert len(tail.read().events) == 2

    replacement = tmp_path / "events.jsonl.new"
    replacement.write_bytes(line(ts=7.0) + line(ts=8.0) + line(ts=9.0))
    os.replace(replacement, path)
    batch = tail.read()
    assert batch.restarted
    assert [e.ts for e in batch.events] == [7.0, 8.0, 9.0]


def test_garbage_lines_are_counted_and_skipped_never_raised(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        line(fraction=0.1)
        + b"not json at all\n"
        + b"[1, 2, 3]\n"
        + b"\xff\xfe\x00garbage bytes\n"
        + b"\n   \n"
        + b'{"no_stage_or_kind": true, "ts": "yesterday"}\n'
        + line(stage="mystery", kind="sparkle", glitter=3, nested={"a": [1]})
        + line(fraction=0.2)
    )
    batch = EventTail(path).read()
    assert batch.bad_lines == 3
    assert [(e.stage, e.kind) for e in batch.events] == [
        ("select", "progress"),
        ("?", "?"),
        ("mystery", "sparkle"),
        ("select", "progress"),
    ]
    assert batch.events[1].ts is None  # a ts that is not a number is dropped, the line is kept


def test_missing_file_is_waited_for(tmp_path):
    path = tmp_path / "not-yet" / "events.jsonl"
    tail = EventTail(path)
    assert not tail.read().exists
    path.parent.mkdir()
    path.write_bytes(line(kind="start", shards=8))
    batch = tail.read()
    assert batch.exists and [e.kind for e in batch.events] == ["start"]


def test_an_endless_line_is_dropped_and_reading_goes_on(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"junk": "' + b"x" * (MAX_LINE_BYTES + 10))
    tail = EventTail(path)
    while tail.read().more:
        pass
    append(path, b'"}\n' + line(fraction=0.9))
    batch = tail.read()
    assert [e.data.get("fraction") for e in batch.events] == [0.9]
    assert batch.bad_lines == 1


def test_large_backlog_is_read_in_bounded_slices(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(line(ts=float(i), fraction=i / 20000, padding="p" * 100) for i in range(20000)))
    tail = EventTail(path)
    first = tail.read()
    assert first.more and 0 < len(first.events) < 20000
    assert len(read_all(path).events) == 20000
