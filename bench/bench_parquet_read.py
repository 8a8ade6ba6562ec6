"""Parquet read path: what ``select``'s workers do per parquet row before tokenising (decode the text and
``source`` columns, make Python strings, skip and count bad rows) against pyarrow's own decoding of the
same file, in one run. The parquet file is made from ``../shared/corpus/pool/`` in a temporary folder
(every field of every document, 10,000-row groups, pyarrow's default snappy compression).

    .venv/bin/python bench/bench_parquet_read.py

Figures are MB of document text (UTF-8) per second, all from the same file:
- ``pyarrow_all_columns``: ``ParquetFile.iter_batches`` over every column, Arrow arrays only;
- ``pyarrow_text_columns``: the same, only the two columns select reads;
- ``pyarrow_text_to_python``: those two columns made Python strings (``to_pylist``), no checks;
- ``blissctl``: ``engine.data.sources.iter_text_records``, every valid document's (row, text, source);
- ``blissctl_jsonl``: the same documents read from the pool's zstd JSONL shards, for comparison.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from _common import pool_shards, record

from engine.data.sources import ReadTally, SkipCounts, iter_text_records, read_documents

ROW_GROUP = 10_000
ROUNDS = 3


def make_parquet(shards: list[Path], path: Path) -> int:
    writer = None
    rows = 0
    for shard in shards:
        table = pa.Table.from_pylist([doc.record for doc in read_documents([shard])])
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table.cast(writer.schema), row_group_size=ROW_GROUP)
        rows += table.num_rows
    writer.close()
    return rows


def pyarrow_decode(path: Path, columns, to_python: bool) -> int:
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns, use_threads=False):
        if to_python:
            for i in range(batch.num_columns):
                n += len(batch.column(i).to_pylist())
        else:
            n += batch.num_rows
    return n


def blissctl_read(path: Path) -> tuple[int, int]:
    tally = ReadTally()
    docs = sum(1 for _ in iter_text_records(path, SkipCounts(), tally))
    return tally.line_bytes, docs


def main() -> None:
    shards = pool_shards()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pool.parquet"
        rows = make_parquet(shards, path)
        text_columns = ["text", "source"] if "source" in pq.read_schema(path).names else ["text"]
        text_mb = blissctl_read(path)[0] / 1e6
        jsonl_text_mb = sum(blissctl_read(s)[0] for s in shards) / 1e6  # whole lines: JSON syntax and fields too
        ways = {
            "pyarrow_all_columns": lambda: pyarrow_decode(path, None, False),
            "pyarrow_text_columns": lambda: pyarrow_decode(path, text_columns, False),
            "pyarrow_text_to_python": lambda: pyarrow_decode(path, text_columns, True),
            "blissctl": lambda: blissctl_read(path),
            "blissctl_jsonl": lambda: [blissctl_read(s) for s in shards],
        }
        seconds = dict.fromkeys(ways, 0.0)
        for _ in range(ROUNDS):  # interleaved, so that every way sees the same machine load
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                seconds[name] += time.perf_counter() - start
        mb_s = {name: round(ROUNDS * text_mb / s, 1) for name, s in seconds.items()}
        figures = {
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "rows": rows,
            "row_groups": pq.ParquetFile(path).num_row_groups,
            "text_mb": round(text_mb, 1),
            "jsonl_line_mb": round(jsonl_text_mb, 1),
            "rounds": ROUNDS,
            "text_mb_per_s": mb_s,
            "docs_per_s_blissctl": round(ROUNDS * rows / seconds["blissctl"]),
            "ratio_to_pyarrow_text_columns": round(seconds["pyarrow_text_columns"] / seconds["blissctl"], 3),
            "ratio_to_pyarrow_text_to_python": round(seconds["pyarrow_text_to_python"] / seconds["blissctl"], 3),
            "ratio_to_pyarrow_all_columns": round(seconds["pyarrow_all_columns"] / seconds["blissctl"], 3),
            "parquet_speedup_over_jsonl": round(seconds["blissctl_jsonl"] / seconds["blissctl"], 3),
        }
    record("parquet_read", figures)


if __name__ == "__main__":
    main()
