"""Reading C4-style shards: formats, discovery, bad records skipped and counted, corrupt files."""

from __future__ import annotations

import gzip

import orjson
import pytest

from engine.data.sources import SkipCounts, discover_shards, iter_raw_lines, read_documents, shard_labels
from engine.errors import CorruptInputError, UserError
from tests.conftest import make_records, write_shard


@pytest.mark.parametrize("name", ["a.json.gz", "a.jsonl.zst", "a.jsonl"])
@pytest.mark.parametrize("frames", [1, 3])
def test_every_format_reads_every_document_with_all_fields(tmp_path, name, frames):
    records = make_records(50, seed=7)
    path = write_shard(tmp_path / name, records, frames=frames)
    docs = list(read_documents([path]))
    assert [d.record for d in docs] == records
    assert [d.line for d in docs] == list(range(50))


def test_bad_lines_are_skipped_counted_and_keep_line_numbers(tmp_path):
    good = make_records(3, seed=1)
    lines = [
        orjson.dumps(good[0]),
        b'{"text": "unterminated',  # malformed JSON
        b'{"url": "no text here"}',  # missing text
        b'{"text": 42}',  # text not a string
        b'["text", "not an object"]',
        b'{"text": "caf\xe9 latin-1 byte"}',  # bad UTF-8
        b'{"text": "lone \\ud800 surrogate"}',  # cannot be UTF-8 either
        b"",  # blank line
        b'{"text": "   "}',  # empty text
        orjson.dumps(good[1]),
        orjson.dumps(good[2]),
    ]
    path = write_shard(tmp_path / "mixed.jsonl.zst", lines)
    skips = SkipCounts()
    docs = list(read_documents([path], skips))
    assert [d.text for d in docs] == [g["text"] for g in good]
    assert [d.line for d in docs] == [0, 9, 10]  # ids stay the physical line numbers
    assert skips.as_dict() == {
        "malformed_json": 1, "missing_text": 3, "bad_utf8": 2, "empty_text": 1, "blank_lines": 1,
    }
    assert skips.total == 8


def test_last_line_without_newline_is_read(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "two"}')
    assert [d.text for d in read_documents([path])] == ["one", "two"]


@pytest.mark.parametrize("name", ["empty.json.gz", "empty.jsonl.zst", "empty.jsonl"])
def test_empty_files_hold_no_documents(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    assert list(read_documents([path])) == []


@pytest.mark.parametrize("name", ["cut.jsonl.zst", "cut.json.gz"])
def test_truncated_file_names_the_file_and_line_reached(tmp_path, name):
    path = write_shard(tmp_path / name, make_records(3000, seed=3))  # several zstd blocks
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    lines = []
    with pytest.raises(CorruptInputError) as caught:
        for raw in iter_raw_lines(path):
            lines.append(raw)
    assert caught.value.path == str(path)
    assert caught.value.line == len(lines) > 0  # everything before the error was delivered
    assert name in str(caught.value) and "truncated" in str(caught.value)


def test_corrupt_zstd_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "garbage.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00\xff" * 100)
    with pytest.raises(CorruptInputError, match="garbage.jsonl.zst"):
        list(iter_raw_lines(path))


def test_corrupt_gzip_is_an_error(tmp_path):
    path = tmp_path / "garbage.json.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n')[:10] + b"\x00" * 50)
    with pytest.raises(CorruptInputError, match="garbage.json.gz"):
        list(iter_raw_lines(path))


def test_discovery_of_files_folders_and_globs(tmp_path, corpus):
    folder = tmp_path / "pool"
    (folder / "notes.txt").write_text("not a shard")
    assert discover_shards(str(folder)) == sorted(p.resolve() for p in corpus)
    assert discover_shards(str(folder / "*.zst")) == sorted(p.resolve() for p in corpus if p.name.endswith(".zst"))
    assert discover_shards([str(corpus[2]), str(corpus[0]), str(corpus[0])]) == sorted([corpus[0].resolve(), corpus[2].resolve()])
    assert shard_labels(discover_shards(str(folder)))[0] == "c4-train.00000-of-00004.json.gz"


@pytest.mark.parametrize(
    "spec, message",
    [("missing.jsonl", "input not found"), ("nothing-*.jsonl.zst", "no input files match"), ("notes.txt", "unsupported")],
)
def test_discovery_errors_are_one_line(tmp_path, spec, message):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=message):
        discover_shards(str(tmp_path / spec))


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .json.gz"):
        discover_shards(str(tmp_path / "empty"))


def test_select_reader_agrees_with_read_documents(tmp_path):
    """select's reader must see the same documents, lines, sources and skips as read_documents."""
    from engine.data.sources import ReadTally, iter_text_records

    good = [orjson.dumps(r) for r in make_records(2000, seed=4)]
    bad = [b'{"text": broken', b"", b'{"text": 1}', b'{"text": "\xff"}', b"   ", b'{"text": "x", "source": 5}',
           b'{"text": "lone \\udc00"}', b'{"text": ""}']
    lines = good[:700] + bad + good[700:]
    for name in ("mixed.jsonl.zst", "mixed.json.gz", "mixed.jsonl"):
        path = write_shard(tmp_path / name, lines, frames=4)
        slow_skips, fast_skips, tally = SkipCounts(), SkipCounts(), ReadTally()
        slow = [(d.line, d.text, d.record.get("source") if isinstance(d.record.get("source"), str) else "")
                for d in read_documents([path], slow_skips)]
        fast = list(iter_text_records(path, fast_skips, tally))
        assert fast == slow
        assert fast_skips == slow_skips and fast_skips.total == len(bad) - 1  # a non-string source is no reason to skip
        assert tally.lines == len(lines)
