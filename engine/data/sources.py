"""Reading documents: C4's ``*.json.gz``, zstd ``*.jsonl.zst`` and plain ``*.jsonl`` (``engine.data.formats``
is the table of what can be read and how).

A document is identified by (shard, line): the shard's position in the sorted input list and the
0-based physical line number inside the decompressed file, blank and bad lines included, so an id never
depends on worker count, file order on the command line or a resume.

Bad records are skipped and counted (``SkipCounts``), never fatal. A truncated or corrupt compressed
file raises ``CorruptInputError`` naming the file and the line reached.
"""

from __future__ import annotations

import glob
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson
import zstandard

from engine.data.formats import ReadPosition, decompressed_stream, is_supported
from engine.errors import CorruptInputError, UserError


def discover_shards(specs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, folders and globs into a sorted, de-duplicated list of input shards."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    found: set[Path] = set()
    for spec in specs:
        text = os.fspath(spec)
        path = Path(text)
        if path.is_dir():
            matches = [p for p in path.rglob("*") if p.is_file() and is_supported(p)]
            if not matches:
                raise UserError(f"no .json.gz, .jsonl.zst or .jsonl files in folder {text}")
        elif path.is_file():
            if not is_supported(path):
                raise UserError(f"{text}: unsupported file type (expected .json.gz, .jsonl.zst or .jsonl)")
            matches = [path]
        elif glob.has_magic(text):
            matches = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
            matches = [p for p in matches if is_supported(p)]
            if not matches:
                raise UserError(f"no input files match {text}")
        else:
            raise UserError(f"input not found: {text}")
        found.update(p.resolve() for p in matches)
    return sorted(found)


def shard_labels(paths: Sequence[Path]) -> list[str]:
    """Stable, unique names for shards: the path relative to the inputs' common folder.

    Used to name per-shard outputs and to seed per-document hashes, so they must not depend on where the
    corpus is mounted.
    """
    if not paths:
        return []
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(common).as_posix() for p in paths]


@dataclass
class SkipCounts:
    """Lines that did not become documents, by reason."""

    malformed_json: int = 0
    missing_text: int = 0
    """The object has no ``text`` field, or it is not a string (or the line is not an object)."""
    bad_utf8: int = 0
    empty_text: int = 0
    blank_lines: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def add(self, other: SkipCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> SkipCounts:
        return cls(**{f.name: int(data.get(f.name, 0)) for f in fields(cls)})


def iter_raw_lines(path: Path, position: ReadPosition | None = None) -> Iterator[bytes]:
    """Every physical line of ``path`` (decompressed, without the newline), blank ones included.

    Raises ``CorruptInputError`` with the number of complete lines read when the file is truncated or
    corrupt; everything yielded before that is valid.
    """
    line_no = 0
    pending: list[bytes] = []  # the unfinished line, in pieces: a 50 MB line is joined once, not per block
    try:
        for block in decompressed_stream(path, position):
            if b"\n" not in block:
                pending.append(block)
                continue
            lines = block.split(b"\n")
            if pending:
                pending.append(lines[0])
                lines[0] = b"".join(pending)
            rest = lines.pop()
            pending = [rest] if rest else []
            line_no += len(lines)
            yield from lines
    except (EOFError, zlib.error, zstandard.ZstdError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise UserError(f"input not found: {path}") from None
        raise CorruptInputError(path, line_no, _describe(error)) from None
    if pending:
        yield b"".join(pending)


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, zstandard.ZstdError):
        return f"corrupt zstd data: {text}"
    if isinstance(error, zlib.error):
        return f"corrupt gzip data: {text}"
    return text


def parse_document(raw: bytes, skips: SkipCounts) -> tuple[dict[str, Any], str] | None:
    """The JSON object and its ``text``, or ``None`` after counting why the line was skipped."""
    if not raw or raw.isspace():  # isspace() tests without copying the line, unlike strip()
        skips.blank_lines += 1
        return None
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        # orjson rejects invalid UTF-8 and lone surrogates with the same exception type as bad syntax.
        try:
            raw.decode("utf-8")
            bad_encoding = "surrogate" in str(error)
        except UnicodeDecodeError:
            bad_encoding = True
        if bad_encoding:
            skips.bad_utf8 += 1
        else:
            skips.malformed_json += 1
        return None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        skips.missing_text += 1
        return None
    if not text or text.isspace():
        skips.empty_text += 1
        return None
    return record, text


@dataclass(frozen=True, slots=True)
class Document:
    """One input document: where it is, its text and the whole record (every field, untouched)."""

    path: Path
    line: int
    text: str
    record: dict[str, Any] = field(repr=False)


def read_documents(paths: Iterable[Path], skips: SkipCounts | None = None) -> Iterator[Document]:
    """Stream the documents of every shard in ``paths``, counting skipped lines into ``skips``."""
    skips = skips if skips is not None else SkipCounts()
    for path in paths:
        for line, raw in enumerate(iter_raw_lines(Path(path))):
            parsed = parse_document(raw, skips)
            if parsed is not None:
                record, text = parsed
                yield Document(path=Path(path), line=line, text=text, record=record)


def read_texts(specs: str | os.PathLike | Sequence[str | os.PathLike], limit: int | None = None) -> list[str]:
    """The texts of the documents in ``specs`` (files, folders or globs), at most ``limit`` of them."""
    texts: list[str] = []
    for doc in read_documents(discover_shards(specs)):
        texts.append(doc.text)
        if limit is not None and len(texts) >= limit:
            break
    return texts


class ReadTally:
    """Running totals of one shard's read: lines, bytes of text lines, compressed bytes consumed."""

    __slots__ = ("lines", "line_bytes", "position")

    def __init__(self) -> None:
        self.lines = 0
        self.line_bytes = 0
        self.position = ReadPosition()


def iter_text_records(path: Path, skips: SkipCounts, tally: ReadTally) -> Iterator[tuple[int, str, str]]:
    """(line, text, source or "") of every valid document of ``path``: the hot path of ``select``.

    Only the two fields the selection needs leave this function; the whole line is copied later,
    byte for byte, by the writer. Line-at-a-time orjson measured faster here than decoding whole
    blocks (orjson on a JSON array, msgspec's ``decode_lines``); see bench/bench_read.py.
    """
    for line, raw in enumerate(iter_raw_lines(path, tally.position)):
        tally.lines = line + 1
        tally.line_bytes += len(raw) + 1
        parsed = parse_document(raw, skips)
        if parsed is not None:
            source = parsed[0].get("source")
            yield line, parsed[1], source if isinstance(source, str) else ""
