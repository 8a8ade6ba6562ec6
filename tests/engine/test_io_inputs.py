"""Inputs where users' data lives: parquet, Hugging Face ``save_to_disk`` folders and URLs (fsspec), each
compared with the same documents as JSONL read and selected in one process."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data.sources import (
    ReadTally,
    SkipCounts,
    discover_shards,
    iter_text_records,
    read_documents,
    shard_labels,
)
from engine.errors import CorruptInputError, UserError
from engine.run_dir import RunDir
from engine.select.config import SelectConfig
from engine.select.stage import run_select
from tests.conftest import make_records, write_shard

BAD_UTF8 = b"caf\xe9 latin-1"


def rows_with_bad_ones(n: int, seed: int) -> list[dict]:
    """Documents with, here and there, a null text, an empty one and one that is not UTF-8."""
    rows = make_records(n, seed=seed)
    rng = random.Random(seed)
    for j, i in enumerate(rng.sample(range(n), 6)):
        rows[i] = {**rows[i], "text": [None, "   ", BAD_UTF8][j % 3]}
    return rows


def jsonl_line(row: dict) -> bytes:
    if isinstance(row["text"], bytes):  # raw bytes inside the JSON string: the bad UTF-8 a crawl has
        return orjson.dumps({**row, "text": "@@"}).replace(b'"@@"', b'"' + row["text"] + b'"')
    return orjson.dumps(row)


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = [r["text"].encode() if isinstance(r["text"], str) else r["text"] for r in rows]
    columns = {"text": pa.array(texts, pa.binary()).view(pa.string())}  # parquet stores bytes unchecked
    for name in ("timestamp", "url", "source"):
        columns[name] = pa.array([r[name] for r in rows], pa.string())
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def twin_pools(tmp_path):
    """The same three shards as JSONL (zstd) and as parquet (several row groups each)."""
    shards = [rows_with_bad_ones(150, seed) for seed in (21, 22, 23)]
    jsonl = [write_shard(tmp_path / "jsonl" / f"part-{i}.jsonl.zst", [jsonl_line(r) for r in rows])
             for i, rows in enumerate(shards)]
    parquet = [write_parquet(tmp_path / "parquet" / f"part-{i}.parquet", rows) for i, rows in enumerate(shards)]
    return jsonl, parquet, shards


def records_of(path, text_field="text"):
    skips, tally = SkipCounts(), ReadTally()
    return list(iter_text_records(path, skips, tally, text_field)), skips, tally


def test_parquet_rows_read_as_the_jsonl_lines_do_bad_rows_skipped_and_counted(twin_pools):
    jsonl, parquet, _ = twin_pools
    for a, b in zip(jsonl, parquet, strict=True):
        from_jsonl, jsonl_skips, jsonl_tally = records_of(a)
        from_parquet, parquet_skips, parquet_tally = records_of(b)
        assert from_parquet == from_jsonl  # (row, text, source): ids are row numbers, as lines are
        assert parquet_skips.as_dict() == jsonl_skips.as_dict()
        assert parquet_skips.missing_text == parquet_skips.empty_text == parquet_skips.bad_utf8 == 2
        assert parquet_tally.lines == jsonl_tally.lines == 150
        # progress counts the stored bytes as the row groups go by (the footer aside)
        assert 0.5 * b.stat().st_size < parquet_tally.position.stored_bytes <= b.stat().st_size
    # read_documents gives the whole row, every column
    first = next(read_documents([parquet[0]]))
    assert set(first.record) == {"text", "timestamp", "url", "source"} and first.text == first.record["text"]


def test_the_text_column_is_chosen_with_text_field_and_a_missing_one_is_one_line(tmp_path):
    rows = make_records(20, seed=3)
    table = pa.table({"content": [r["text"] for r in rows], "id": list(range(20))})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path)
    got, skips, _ = records_of(path, "content")
    assert [t for _, t, _ in got] == [r["text"] for r in rows] and skips.total == 0
    with pytest.raises(UserError, match=r"no column 'text' \(its columns: content, id\); name the text column with --text-field"):
        records_of(path)
    # the same flag names a JSONL field
    lines = write_shard(tmp_path / "c.jsonl", [{"content": r["text"]} for r in rows])
    assert [t for _, t, _ in records_of(lines, "content")[0]] == [r["text"] for r in rows]
    with pytest.raises(UserError, match="--text-field"):
        SelectConfig(text_field="")


def test_a_corrupt_parquet_file_stops_with_its_name(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", make_records(50, seed=1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptInputError, match="x.parquet: not a readable parquet file"):
        records_of(path)


def select(root: Path, name: str, inputs, tokenizer, **overrides) -> tuple[dict, RunDir]:
    settings = {"workers": 0, "budget": "40%", **overrides}
    config = SelectConfig(inputs=tuple(str(p) for p in inputs), tokenizer=str(tokenizer), runs_dir=str(root), **settings)
    run_dir = RunDir.named(name, root)
    return run_select(config, run_dir), run_dir


def kept_texts(run_dir: RunDir) -> list[str]:
    import zstandard

    texts = []
    for path in sorted(run_dir.selected.glob("*.jsonl.zst")):
        with open(path, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        texts += [orjson.loads(line)["text"] for line in data.splitlines()]
    return texts


def test_selecting_from_parquet_keeps_what_selecting_from_jsonl_keeps(tmp_path, twin_pools, small_tokenizer):
    """DSIR scores the text itself, so the same documents score the same whatever file holds them."""
    jsonl, parquet, _ = twin_pools
    val = write_shard(tmp_path / "val.jsonl", make_records(40, seed=77))
    a, run_a = select(tmp_path / "runs", "jsonl", jsonl, small_tokenizer, scorer="dsir", val=str(val))
    b, run_b = select(tmp_path / "runs", "parquet", parquet, small_tokenizer, scorer="dsir", val=str(val))
    for key in ("documents", "tokens", "skipped", "score_threshold"):
        assert b[key] == a[key], key
    assert b["first_excluded"]["line"] == a["first_excluded"]["line"]
    assert b["skipped"]["total"] == 18
    assert [e["kept_documents"] for e in b["inputs"]] == [e["kept_documents"] for e in a["inputs"]]
    assert kept_texts(run_b) == kept_texts(run_a)  # the same documents, in the same order


def test_a_datasets_save_to_disk_folder_is_a_pool_of_its_arrow_files(tmp_path, small_tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [r for seed in (31, 32) for r in make_records(120, seed=seed)]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder), num_shards=2)
    (folder / "notes.jsonl").write_text('{"text": "not part of the dataset"}\n')  # only state.json's files count
    shards = discover_shards(str(folder))
    assert [Path(p).name for p in shards] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    halves = [write_shard(tmp_path / "jsonl" / f"half-{i}.jsonl", rows[i * 120 : (i + 1) * 120]) for i in range(2)]
    val = write_shard(tmp_path / "val.jsonl", make_records(40, seed=77))
    a, run_a = select(tmp_path / "runs", "jsonl", halves, small_tokenizer, unit="docs", scorer="dsir", val=str(val))
    b, run_b = select(tmp_path / "runs", "arrow", [folder], small_tokenizer, unit="docs", scorer="dsir", val=str(val))
    assert b["documents"] == a["documents"] and b["tokens"] == a["tokens"]
    assert b["first_excluded"]["line"] == a["first_excluded"]["line"]
    assert kept_texts(run_b) == kept_texts(run_a) and len(kept_texts(run_b)) == b["documents"]["kept"] > 0
    # rows keep every column when written out as JSONL
    import zstandard

    out = next(iter(sorted(run_b.selected.glob("*.jsonl.zst"))))
    first = orjson.loads(zstandard.ZstdDecompressor().stream_reader(open(out, "rb")).read().splitlines()[0])
    assert set(first) == {"text", "timestamp", "url", "source"} and first in rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:10])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="DatasetDict saved with save_to_disk: pass one split's folder, e.g. .*dd/train"):
        discover_shards(str(tmp_path / "dd"))


def test_urls_read_like_local_files_memory_and_file_protocols(tmp_path, twin_pools, small_tokenizer):
    """fsspec's memory:// stands for object storage (s3://, gs://, hf://, https:// go the same way)."""
    import fsspec

    jsonl, parquet, _ = twin_pools
    memory = fsspec.filesystem("memory")
    for path in (*jsonl, *parquet):
        memory.pipe(f"/pool/{path.parent.name}/{path.name}", path.read_bytes())
    try:
        urls = discover_shards("memory://pool/parquet/")
        assert urls == [f"memory:///pool/parquet/{p.name}" for p in parquet]
        assert discover_shards("memory://pool/*/part-1.*") == ["memory:///pool/jsonl/part-1.jsonl.zst",
                                                              "memory:///pool/parquet/part-1.parquet"]
        assert shard_labels(urls) == shard_labels(parquet) == [p.name for p in parquet]
        for local, url in zip(jsonl + parquet, discover_shards(["memory://pool/jsonl", "memory://pool/parquet"]),
                              strict=True):
            assert records_of(url)[0] == records_of(local)[0]
        # the same labels, so even the random scorer's (seed, shard, line) hashes agree: the same selection
        local, _ = select(tmp_path / "runs", "local", parquet, small_tokenizer)
        remote, run_remote = select(tmp_path / "runs", "remote", ["memory://pool/parquet/*.parquet"], small_tokenizer)
        assert remote["documents"] == local["documents"] and remote["first_excluded"] == local["first_excluded"]
        assert remote["inputs"][0]["path"] == "memory:///pool/parquet/part-0.parquet"
        with pytest.raises(UserError, match="input not found: memory://pool/nothing"):
            discover_shards("memory://pool/nothing")
    finally:
        memory.rm("/pool", recursive=True)
    # file:// goes through fsspec too, and reaches worker processes (memory:// lives in one process only)
    via_file, _ = select(tmp_path / "runs", "file", [f"file://{parquet[0].parent}"], small_tokenizer, workers=1)
    assert via_file["documents"] == local["documents"]


def test_a_url_of_an_unknown_protocol_is_one_line():
    with pytest.raises(UserError, match="cannot open this kind of URL here"):
        discover_shards("nosuchproto://bucket/x.parquet")


def test_kept_row_lookup_skips_row_groups_with_nothing_kept(tmp_path):
    from engine.data.columnar import kept_batches, open_rows

    path = write_parquet(tmp_path / "x.parquet", make_records(300, seed=4), row_group_size=50)
    wanted = np.array([3, 7, 260, 299])
    got = pa.Table.from_batches(list(kept_batches(path, "parquet", wanted)))
    assert got.column("text").to_pylist() == [make_records(300, seed=4)[i]["text"] for i in wanted]
    with open_rows(path, "parquet") as rows:
        assert rows.row_group_rows() == [50] * 6


def test_scoring_reads_only_the_text_columns_of_a_parquet_file(tmp_path, monkeypatch):
    """Streaming, by range: a wide column select does not need is never fetched (what a URL's reads cost)."""
    import os

    import engine.data.columnar as columnar

    records = make_records(400, seed=8)
    table = pa.table({"text": [r["text"] for r in records], "source": [r["source"] for r in records],
                      "blob": [os.urandom(2000) for _ in records]})  # incompressible: most of the file
    path = tmp_path / "wide.parquet"
    pq.write_table(table, path, row_group_size=100)
    fetched = []
    real_open = columnar.open_input

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, *args):
            data = self.f.read(*args)
            fetched.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(columnar, "open_input", lambda location: Counting(real_open(location)))
    got, _, _ = records_of(path)
    assert [t for _, t, _ in got] == [r["text"] for r in records]
    assert 0 < sum(fetched) < 0.3 * path.stat().st_size


def test_an_arrow_ipc_file_reads_like_the_stream_datasets_writes(tmp_path):
    rows = rows_with_bad_ones(60, seed=9)
    texts = [r["text"].encode() if isinstance(r["text"], str) else r["text"] for r in rows]
    table = pa.table({"text": pa.array(texts, pa.binary()).view(pa.string()),
                      "source": [r["source"] for r in rows]})
    with pa.ipc.new_file(tmp_path / "f.arrow", table.schema) as out:  # the IPC file format (Feather 2)
        for batch in table.to_batches(max_chunksize=25):
            out.write_batch(batch)
    with pa.ipc.new_stream(tmp_path / "s.arrow", table.schema) as out:
        out.write_table(table, max_chunksize=25)
    lines = write_shard(tmp_path / "same.jsonl", [jsonl_line(r) for r in rows])
    expected, skips, _ = records_of(lines)
    for name in ("f.arrow", "s.arrow"):
        got, arrow_skips, tally = records_of(tmp_path / name)
        assert got == expected and arrow_skips.as_dict() == skips.as_dict() and tally.lines == 60
