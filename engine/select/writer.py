"""Writing the chosen subset in the ``--output-format`` (the table in ``engine.data.formats``).

``jsonl.zst``, the default, is written here: zstd JSONL shards holding the kept lines byte for byte, so
every field survives unchanged, in their original order within the shard (a parquet or Arrow row
becomes one JSON object with every column). ``parquet`` (``engine.select.parquet_output``) and
``megatron`` (``engine.select.megatron_output``) are their own modules with the same ``write_shard``.
Each output file appears atomically (temporary name, then rename): a reader never sees half a shard,
and an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import base64
import importlib
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import zstandard

from engine.data.formats import DEFAULT_OUTPUT_FORMAT, Format, format_of, output_format, output_name
from engine.data.locations import as_location
from engine.data.sources import SkipCounts, iter_raw_lines, parse_document
from engine.run_dir import atomic_write_with
from engine.runtime import die_with_parent

ZSTD_LEVEL = 3


@dataclass(frozen=True)
class WriteJob:
    source: str
    output: str
    kept_lines: np.ndarray  # sorted uint32 line numbers to copy (row numbers of a columnar file)
    output_format: str = DEFAULT_OUTPUT_FORMAT
    text_field: str = "text"
    """Where each document's text is (``--text-field``): what ``megatron`` tokenises."""
    tokenizer_path: str | None = None
    """The run's tokenizer (``megatron``)."""


def shard_output(selected: Path, label: str, chosen: Format) -> Path:
    """Where a shard's kept documents go: ``selected/<label>.<suffix>``; for a format joined into one
    file at the end (``megatron``), a part under ``selected/parts/``."""
    name = output_name(label, chosen.suffix)
    return selected / "parts" / name if chosen.output == "megatron" else selected / name


def kept_raw_lines(job: WriteJob) -> Iterator[bytes]:
    """The kept lines of a line-format shard, exactly as stored, in file order."""
    wanted = job.kept_lines
    if wanted.size == 0:
        return
    next_index, next_line = 0, int(wanted[0])
    for line, text in enumerate(iter_raw_lines(as_location(job.source))):
        if line != next_line:
            continue
        yield text
        next_index += 1
        if next_index == wanted.size:
            return
        next_line = int(wanted[next_index])


def source_has_rows(job: WriteJob) -> str | None:
    """``parquet`` or ``arrow`` when the shard is a columnar file, else None (JSON Lines)."""
    found = format_of(as_location(job.source))
    return found.rows if found is not None else None


def kept_records(job: WriteJob) -> Iterator[dict[str, Any]]:
    """The kept documents of any shard as whole records (every field or column)."""
    kind = source_has_rows(job)
    if kind is not None:
        from engine.data.columnar import batch_records, kept_batches

        for batch in kept_batches(as_location(job.source), kind, job.kept_lines):
            yield from batch_records(batch)
        return
    skips = SkipCounts()
    for raw in kept_raw_lines(job):
        parsed = parse_document(raw, skips, job.text_field)
        if parsed is not None:  # a kept line parsed once already: it always does, unless the file changed
            yield parsed[0]


def kept_texts(job: WriteJob) -> Iterator[str]:
    """The texts of the kept documents of any shard, in file order."""
    kind = source_has_rows(job)
    if kind is None:
        skips = SkipCounts()
        for raw in kept_raw_lines(job):
            parsed = parse_document(raw, skips, job.text_field)
            if parsed is not None:
                yield parsed[1]
        return
    from engine.data.columnar import kept_batches, valid_texts

    for batch in kept_batches(as_location(job.source), kind, job.kept_lines):
        yield from (t for t in valid_texts(batch.column(job.text_field), SkipCounts()) if t is not None)


def _json_default(value: Any) -> Any:
    """JSON for what a parquet column may hold and JSON has not: bytes as UTF-8 text when they are,
    else base64; anything else (decimals, dates) as its string."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode()
    return str(value)


def write_shard(job: WriteJob) -> int:
    """``jsonl.zst``: the kept lines byte for byte (a columnar shard's kept rows as JSON objects)."""
    written = 0
    rows = source_has_rows(job) is not None

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw) as out:
            if rows:
                for record in kept_records(job):
                    out.write(orjson.dumps(record, default=_json_default,
                                           option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))
                    written += 1
                return
            for text in kept_raw_lines(job):
                out.write(text + b"\n")
                written += 1

    atomic_write_with(Path(job.output), write)
    check_written(job, written)
    return written


def check_written(job: WriteJob, written: int) -> None:
    if written != job.kept_lines.size:
        raise RuntimeError(f"{job.source}: expected {job.kept_lines.size} kept documents, found {written}; did the "
                           "file change?")


def _writer_of(job: WriteJob):
    module = output_format(job.output_format).writer
    return importlib.import_module(module) if module != __name__ else None


def write_selected_shard(job: WriteJob) -> int:
    """Write the kept documents of ``job.source`` into ``job.output``; returns how many were written."""
    writer = _writer_of(job)
    return write_shard(job) if writer is None else writer.write_shard(job)


def _init_writer(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what Ctrl-C does


def write_selected_shards(jobs: list[WriteJob], workers: int) -> list[int]:
    """Write every job, in ``workers`` processes (0: here); results in job order."""
    if workers <= 0 or not jobs:
        return [write_selected_shard(job) for job in jobs]
    context = mp.get_context("spawn")
    with context.Pool(min(workers, len(jobs)), initializer=_init_writer, initargs=(os.getpid(),)) as pool:
        return pool.map(write_selected_shard, jobs, chunksize=1)


def finish_outputs(chosen: Format, selected: Path, files: list[tuple[str, int]], tokenizer_path: str
                   ) -> dict[str, Any]:
    """After every shard is written (``files``: each one's output and documents, in shard order): join
    the parts of a joined format (``megatron``); returns what the manifest says of the output (``files``,
    and the format's own facts)."""
    module = importlib.import_module(chosen.writer)
    if hasattr(module, "finish"):
        return module.finish(selected, files, tokenizer_path)
    return {"files": [Path(output).name for output, _ in files]}


OUTPUT_PATTERNS = {
    "jsonl.zst": ("selected/*.jsonl.zst",),
    "parquet": ("selected/*.parquet",),
    "megatron": ("selected/*.bin", "selected/*.idx", "selected/parts/*.bin", "selected/parts/*.sizes"),
}
"""What each output format writes, relative to the run (``engine.run_dir.STAGE_OUTPUTS`` lists them too):
a selection in one format removes what an earlier one in another left."""
