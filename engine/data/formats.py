"""The input formats: one table from a file's suffix to how its bytes are decompressed, and the suffix
its selected subset is written with. Adding a format is one ``Format`` entry here.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

READ_CHUNK = 1 << 20  # compressed bytes read at a time: large enough to amortise Python overhead
OUTPUT_SUFFIX = ".jsonl.zst"
"""What ``select`` writes, whatever it read: zstd JSON Lines, the kept lines byte for byte."""


class ReadPosition:
    """How many bytes of the file as stored (compressed) have been consumed: for progress and MB/s."""

    __slots__ = ("stored_bytes",)

    def __init__(self) -> None:
        self.stored_bytes = 0


def _chunks(path: Path, position: ReadPosition | None = None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            if position is not None:
                position.stored_bytes += len(chunk)
            yield chunk


def _frames(path: Path, position: ReadPosition | None, new_decoder: Callable[[], Any], cut: str) -> Iterator[bytes]:
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


def _zstd_stream(path: Path, position: ReadPosition | None) -> Iterator[bytes]:
    return _frames(path, position, zstandard.ZstdDecompressor().decompressobj,
                   "zstd stream ends inside a frame (truncated file)")


def _gzip_stream(path: Path, position: ReadPosition | None) -> Iterator[bytes]:
    """C4's ``*.json.gz`` are multi-member gzip files."""
    return _frames(path, position, lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS),
                   "gzip stream ends inside a member (truncated file)")


@dataclass(frozen=True)
class Format:
    suffix: str
    open: Callable[[Path, ReadPosition | None], Iterator[bytes]]
    """Decompressed bytes of a file in chunks, counting the stored bytes read into the position."""


FORMATS = (
    Format(".json.gz", _gzip_stream),  # C4's own shards
    Format(".jsonl.gz", _gzip_stream),
    Format(".jsonl.zst", _zstd_stream),
    Format(".json.zst", _zstd_stream),
    Format(".jsonl", _chunks),
    Format(".json", _chunks),
)


def format_of(path: Path) -> Format | None:
    return next((f for f in FORMATS if path.name.endswith(f.suffix)), None)


def is_supported(path: Path) -> bool:
    return format_of(path) is not None


def decompressed_stream(path: Path, position: ReadPosition | None = None) -> Iterator[bytes]:
    """Decompressed bytes of ``path`` in chunks, chosen by file name."""
    found = format_of(path)
    return (found.open if found is not None else _chunks)(path, position)


def output_name(label: str) -> str:
    """``a/b/c4-train.00000-of-01024.json.gz`` → ``a__b__c4-train.00000-of-01024.jsonl.zst``."""
    name = label.replace("/", "__")
    found = format_of(Path(name))
    return (name[: -len(found.suffix)] if found is not None else name) + OUTPUT_SUFFIX


