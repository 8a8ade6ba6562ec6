"""``select --output-format parquet``: each shard's kept documents as one parquet file, every input column.

A parquet or Arrow shard keeps its own schema (types and metadata untouched), read and written one
row group at a time. A JSONL shard's kept records are gathered first (one shard's kept part, not the
pool) so that the file's schema can be the union of every record's fields, in first-seen order: a
field absent from a record is null there, and a field whose values mix types (a number here, a string
there) is stored as each value's JSON text rather than failing the write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from engine.data.locations import as_location
from engine.run_dir import atomic_write_with
from engine.select.writer import WriteJob, check_written, kept_records, source_has_rows

ROWS_PER_GROUP = 50_000
"""Rows per written row group: ~100 MB of web text, the size readers stream well."""
COMPRESSION = "zstd"


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    """One table of ``records`` whose columns are every field any record has."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types in one field
            columns[name] = pa.array([None if v is None else orjson.dumps(v).decode() for v in values], pa.string())
    return pa.table(columns)


def write_shard(job: WriteJob) -> int:
    kind = source_has_rows(job)
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        if kind is None:
            table = records_table(list(kept_records(job)))
            written = table.num_rows
            pq.write_table(table, tmp, compression=COMPRESSION, row_group_size=ROWS_PER_GROUP)
            return
        from engine.data.columnar import kept_batches, read_schema

        schema = read_schema(as_location(job.source), kind)
        pending: list[pa.RecordBatch] = []
        held = 0
        with pq.ParquetWriter(tmp, schema, compression=COMPRESSION) as out:
            for batch in kept_batches(as_location(job.source), kind, job.kept_lines):
                pending.append(batch)
                held += batch.num_rows
                written += batch.num_rows
                if held >= ROWS_PER_GROUP:  # whole row groups, not one per read batch
                    out.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROWS_PER_GROUP)
                    pending, held = [], 0
            if pending:
                out.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROWS_PER_GROUP)

    atomic_write_with(Path(job.output), write)
    check_written(job, written)
    return written
