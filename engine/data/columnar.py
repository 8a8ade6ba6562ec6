"""Reading the rows of columnar files: parquet, and the Arrow IPC files of a Hugging Face ``save_to_disk``
folder (``data-00000-of-00004.arrow``). Imported only when such a file is read (pyarrow is large).

A document is a row; its id is (shard, row number within the file), as a JSONL document's is (shard,
line). Files are streamed: parquet one row group at a time (and, for ``select``'s scoring, only the
text and ``source`` columns are decoded), Arrow record batch by record batch, through
``engine.data.locations`` so a URL is read by ranges, never downloaded whole. A row whose text is
null, not a string, not UTF-8 or empty is skipped and counted like a bad JSONL line; a file without
the text column is one line naming its columns; a corrupt file stops with the file and row reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from engine.data.formats import ReadPosition
from engine.data.locations import Location, open_input
from engine.errors import CorruptInputError, UserError, first_line

ROW_BATCH = 4096
"""Rows converted to Python at a time: large enough to amortise pyarrow's per-call cost, small enough
that a batch of long documents stays a few MB."""
SOURCE_FIELD = "source"


class RowFile:
    """One columnar file, open: its schema, and its rows in order as record batches."""

    def __init__(self, location: Location, kind: str, position: ReadPosition | None):
        self.location = location
        self.kind = kind
        self.position = position if position is not None else ReadPosition()
        self._file = open_input(location)
        try:
            if kind == "parquet":
                self._parquet = pq.ParquetFile(self._file)
                self.schema = self._parquet.schema_arrow
            else:
                self._parquet = None
                self._arrow_file = self._file.read(6) == b"ARROW1"  # the IPC file format (Feather 2)
                self._file.seek(0)
                self._reader = (pa.ipc.open_file(self._file) if self._arrow_file else pa.ipc.open_stream(self._file))
                self.schema = self._reader.schema
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def row_group_rows(self) -> list[int] | None:
        """Rows in each parquet row group (None for Arrow): lets a writer skip groups with nothing kept."""
        if self._parquet is None:
            return None
        metadata = self._parquet.metadata
        return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]

    def batches(self, columns: list[str] | None = None, row_groups: list[int] | None = None
                ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row, batch) in row order, only ``columns`` (all: None); parquet may skip to
        ``row_groups``. The stored bytes consumed are counted into ``position`` as each part ends."""
        if self._parquet is not None:
            metadata = self._parquet.metadata
            starts = np.concatenate([[0], np.cumsum([metadata.row_group(i).num_rows
                                                     for i in range(metadata.num_row_groups)])])
            for group in range(metadata.num_row_groups) if row_groups is None else row_groups:
                row = int(starts[group])
                # use_threads=False: the reader processes are the parallelism (as for the tokenizer)
                for batch in self._parquet.iter_batches(batch_size=ROW_BATCH, row_groups=[group], columns=columns,
                                                        use_threads=False):
                    yield row, batch
                    row += batch.num_rows
                chunk = metadata.row_group(group)
                self.position.stored_bytes += sum(chunk.column(c).total_compressed_size
                                                  for c in range(chunk.num_columns))
            return
        row = 0
        if self._arrow_file:
            parts = (self._reader.get_batch(i) for i in range(self._reader.num_record_batches))
        else:
            parts = iter(self._reader)
        for batch in parts:
            if columns is not None:
                batch = batch.select(columns)
            self.position.stored_bytes = self._file.tell()
            for start in range(0, batch.num_rows, ROW_BATCH):  # HF writes 1,000-row batches; others may not
                piece = batch.slice(start, ROW_BATCH)
                yield row, piece
                row += piece.num_rows


@contextmanager
def open_rows(location: Location, kind: str, position: ReadPosition | None = None) -> Iterator[RowFile]:
    """A ``RowFile``; any failure of the file itself (not parquet, cut short, corrupt) becomes
    ``CorruptInputError`` naming the file and the rows read before it."""
    reached = [0]
    try:
        rows = RowFile(location, kind, position)
    except FileNotFoundError:
        raise UserError(f"input not found: {location}") from None
    except (pa.ArrowException, OSError, ValueError) as error:
        raise CorruptInputError(location, 0, f"not a readable {kind} file: {first_line(error)}") from None
    try:
        yield _Tracked(rows, reached)
    except (pa.ArrowException, OSError, EOFError) as error:
        if isinstance(error, UserError):
            raise
        raise CorruptInputError(location, reached[0], f"corrupt {kind} data: {first_line(error)}") from None
    finally:
        rows.close()


class _Tracked:
    """A ``RowFile`` that remembers the last row handed out, for the error message of a corrupt file."""

    def __init__(self, rows: RowFile, reached: list[int]):
        self._rows = rows
        self._reached = reached
        self.schema = rows.schema
        self.row_group_rows = rows.row_group_rows

    def batches(self, columns=None, row_groups=None):
        for row, batch in self._rows.batches(columns, row_groups):
            self._reached[0] = row
            yield row, batch
            self._reached[0] = row + batch.num_rows


def text_column_check(schema: pa.Schema, text_field: str, location: Location) -> None:
    """A file without the text column cannot hold a document: one line naming its columns."""
    if schema.get_field_index(text_field) < 0:
        names = ", ".join(schema.names[:20]) + (", ..." if len(schema.names) > 20 else "")
        raise UserError(f"{location}: no column {text_field!r} (its columns: {names}); name the text column "
                        "with --text-field")


def valid_texts(column: pa.Array, skips) -> list[str | None]:
    """Each row's text, or None after counting why it is skipped (as ``parse_document`` does for lines)."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.dictionary_decode(), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            values = column.to_pylist()
        except UnicodeDecodeError:  # parquet does not validate UTF-8: look at each row
            values = _decoded(column.view(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()),
                              skips)
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        values = _decoded(column, skips)
    else:  # a number, a list, a struct: not a text (a null stays a null, counted below)
        skips.missing_text += len(column)
        return [None] * len(column)
    for i, text in enumerate(values):
        if text is None:
            skips.missing_text += 1
        elif text is False:  # bad UTF-8, counted by _decoded
            values[i] = None
        elif not text or text.isspace():
            skips.empty_text += 1
            values[i] = None
    return values


def _decoded(column: pa.Array, skips) -> list[Any]:
    out: list[Any] = []
    for raw in column.to_pylist():
        if raw is None:
            out.append(None)
            continue
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skips.bad_utf8 += 1
            out.append(False)
    return out


def column_values(column: pa.Array) -> list[Any]:
    """A column as Python values; a string column that is not valid UTF-8 (parquet does not check) has
    its bad bytes replaced rather than failing the whole batch."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        kind = column.type
        if pa.types.is_dictionary(kind):
            column, kind = column.dictionary_decode(), kind.value_type
        raw = column.view(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()).to_pylist()
        return [None if v is None else v.decode("utf-8", "replace") for v in raw]


def batch_records(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """The rows of a batch as dicts, column by column (``column_values``)."""
    names = batch.schema.names
    columns = [column_values(batch.column(i)) for i in range(batch.num_columns)]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)] if columns else []


def text_bytes(column: pa.Array) -> int:
    """UTF-8 bytes of a text column (what MB/s counts), without converting it to Python."""
    try:
        import pyarrow.compute as pc

        return int(pc.sum(pc.binary_length(column)).as_py() or 0)
    except (pa.ArrowException, TypeError):
        return int(column.nbytes)


def iter_text_records(location: Location, kind: str, skips, tally, text_field: str
                      ) -> Iterator[tuple[int, str, str]]:
    """(row, text, source or "") of every valid row: ``select``'s hot path, decoding two columns only."""
    with open_rows(location, kind, tally.position) as rows:
        text_column_check(rows.schema, text_field, location)
        source_index = rows.schema.get_field_index(SOURCE_FIELD)
        has_source = (source_index >= 0 and text_field != SOURCE_FIELD
                      and pa.types.is_string(rows.schema.field(source_index).type))
        columns = [text_field, SOURCE_FIELD] if has_source else [text_field]
        for row, batch in rows.batches(columns):
            column = batch.column(0)
            texts = valid_texts(column, skips)
            sources = batch.column(1).to_pylist() if has_source else None
            tally.line_bytes += text_bytes(column)
            tally.lines = row + batch.num_rows
            for i, text in enumerate(texts):
                if text is not None:
                    yield row + i, text, (sources[i] or "") if sources is not None else ""


def iter_documents(location: Location, kind: str, skips, text_field: str
                   ) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(row, text, the whole row as a dict) of every valid row."""
    with open_rows(location, kind) as rows:
        text_column_check(rows.schema, text_field, location)
        for row, batch in rows.batches():
            texts = valid_texts(batch.column(text_field), skips)
            records = batch_records(batch)
            for i, text in enumerate(texts):
                if text is not None:
                    records[i][text_field] = text
                    yield row + i, text, records[i]


def kept_batches(location: Location, kind: str, kept_rows: np.ndarray) -> Iterator[pa.RecordBatch]:
    """The rows ``kept_rows`` (sorted) of a file, every column, in file order; parquet row groups that
    keep nothing are not read at all."""
    with open_rows(location, kind) as rows:
        groups = None
        sizes = rows.row_group_rows()
        if sizes is not None:
            ends = np.cumsum(sizes)
            groups = np.unique(np.searchsorted(ends, kept_rows, side="right")).tolist()
        for row, batch in rows.batches(None, groups):
            lo, hi = np.searchsorted(kept_rows, [row, row + batch.num_rows])
            if hi > lo:
                yield batch.take(pa.array(kept_rows[lo:hi].astype(np.int64) - row))


def read_schema(location: Location, kind: str) -> pa.Schema:
    with open_rows(location, kind) as rows:
        return rows.schema
