"""The formats: one table of what ``blissctl`` reads and writes. Adding a format is one ``Format`` entry.

An input format is found by a file's suffix. Line formats (JSON Lines, plain or compressed) give the
file's decompressed bytes, and a document is a line; columnar formats (parquet, the Arrow files of a
Hugging Face ``save_to_disk`` folder) name the module that reads their rows (``engine.data.columnar``),
imported only when such a file is read, and a document is a row. Either way a document's id is
(shard, line or row). An output format (``select --output-format``) names the module whose
``write_shard`` writes a shard's kept documents (and ``finish``, where the shards are joined).
Every reader opens its file through ``engine.data.locations``, so a URL reads like a local path.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zstandard

from engine.data.locations import Location, name_of, open_input
from engine.errors import UserError

READ_CHUNK = 1 << 20  # compressed bytes read at a time: large enough to amortise Python overhead
OUTPUT_SUFFIX = ".jsonl.zst"
"""What ``select`` writes by default, whatever it read: zstd JSON Lines, the kept lines byte for byte."""


class ReadPosition:
    """How many bytes of the file as stored (compressed) have been consumed: for progress and MB/s."""

    __slots__ = ("stored_bytes",)

    def __init__(self) -> None:
        self.stored_bytes = 0


def _chunks(path: Location, position: ReadPosition | None = None) -> Iterator[bytes]:
    with open_input(path) as f:
        while chunk := f.read(READ_CHUNK):
            if position is not None:
                position.stored_bytes += len(chunk)
            yield chunk


def _frames(path: Location, position: ReadPosition | None, new_decoder: Callable[[], Any], cut: str) -> Iterator[bytes]:
    """Decompressed bytes of every frame (zstd) or member (gzip) of a file, one after the other, as
    ``cat`` of the parts would give them; ends with ``EOFError(cut)`` if the last part is cut short."""
    decoder = new_decoder()
    started = False
    for chunk in _chunks(path, position):
        while chunk:
            started = True
            out = decoder.decompress(chunk)
            if out:
                yield out
            if decoder.eof:  # this part is finished: the rest of the chunk starts the next one
                chunk = decoder.unused_data
                decoder = new_decoder()
                started = False
            else:
                chunk = b""
    if started and not decoder.eof:
        raise EOFError(cut)


def _zstd_stream(path: Location, position: ReadPosition | None) -> Iterator[bytes]:
    return _frames(path, position, zstandard.ZstdDecompressor().decompressobj,
                   "zstd stream ends inside a frame (truncated file)")


def _gzip_stream(path: Location, position: ReadPosition | None) -> Iterator[bytes]:
    """C4's ``*.json.gz`` are multi-member gzip files."""
    return _frames(path, position, lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS),
                   "gzip stream ends inside a member (truncated file)")


@dataclass(frozen=True)
class Format:
    suffix: str
    open: Callable[[Location, ReadPosition | None], Iterator[bytes]] | None = None
    """Line formats: the decompressed bytes of a file in chunks, counting the stored bytes read."""
    rows: str | None = None
    """Columnar formats: the ``engine.data.columnar`` reader of its rows (``parquet`` or ``arrow``)."""
    output: str | None = None
    """The ``select --output-format`` name, when this format can also be written."""
    writer: str | None = None
    """The module whose ``write_shard(job)`` (and ``finish(run_dir, jobs, results)``) writes it."""

    @property
    def is_lines(self) -> bool:
        return self.open is not None


MEGATRON_PREFIX = "subset_text_document"
"""The subset as one Megatron/GPT-NeoX indexed dataset: ``selected/subset_text_document.{bin,idx}`` (the
``<prefix>_text_document`` name Megatron's own preprocessing gives it)."""

FORMATS = (
    Format(".json.gz", _gzip_stream),  # C4's own shards
    Format(".jsonl.gz", _gzip_stream),
    Format(".jsonl.zst", _zstd_stream, output="jsonl.zst", writer="engine.select.writer"),
    Format(".json.zst", _zstd_stream),
    Format(".jsonl", _chunks),
    Format(".json", _chunks),
    Format(".parquet", rows="parquet", output="parquet", writer="engine.select.parquet_output"),
    Format(".arrow", rows="arrow"),  # Arrow IPC streams: the data files of a datasets save_to_disk folder
    Format(".bin", output="megatron", writer="engine.select.megatron_output"),  # output only (with its .idx)
)
OUTPUT_FORMATS = {f.output: f for f in FORMATS if f.output}
"""``select --output-format`` choices: jsonl.zst (the default), parquet, megatron."""
DEFAULT_OUTPUT_FORMAT = "jsonl.zst"


def format_of(path: Location | str) -> Format | None:
    """The input format of a file, by its name (None: not an input format)."""
    name = path if isinstance(path, str) else name_of(path)
    return next((f for f in FORMATS if name.endswith(f.suffix) and (f.is_lines or f.rows)), None)


def is_supported(path: Location | str) -> bool:
    return format_of(path) is not None


def output_format(name: str) -> Format:
    """The output format ``name`` (``--output-format``); a one-line error naming the choices."""
    try:
        return OUTPUT_FORMATS[name]
    except KeyError:
        raise UserError(f"--output-format {name!r}: choose one of {', '.join(OUTPUT_FORMATS)}") from None


def decompressed_stream(path: Location, position: ReadPosition | None = None) -> Iterator[bytes]:
    """Decompressed bytes of ``path`` in chunks, chosen by file name."""
    found = format_of(path)
    if found is not None and not found.is_lines:
        raise ValueError(f"{path}: a {found.rows} file has rows, not lines")
    return (found.open if found is not None else _chunks)(path, position)


def output_name(label: str, suffix: str = OUTPUT_SUFFIX) -> str:
    """``a/b/c4-train.00000-of-01024.json.gz`` → ``a__b__c4-train.00000-of-01024.jsonl.zst`` (or ``suffix``)."""
    name = label.replace("/", "__")
    found = format_of(name)
    return (name[: -len(found.suffix)] if found is not None else name) + suffix
