"""Reading documents: C4's ``*.json.gz``, zstd ``*.jsonl.zst``, plain ``*.jsonl``, parquet and the Arrow
files of a Hugging Face ``save_to_disk`` folder, local or at a URL (``engine.data.formats`` is the table
of what can be read and how, ``engine.data.locations`` where it can be read from).

A document is identified by (shard, line): the shard's position in the sorted input list and the
0-based physical line number inside the decompressed file, blank and bad lines included (for a
columnar file, the row number), so an id never depends on worker count, file order on the command
line or a resume.

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

from engine.data.formats import ReadPosition, decompressed_stream, format_of, is_supported
from engine.data.locations import (
    Location,
    as_location,
    expand_url,
    is_url,
    saved_dataset_files,
    sort_locations,
)
from engine.errors import CorruptInputError, UserError

DEFAULT_TEXT_FIELD = "text"
SUPPORTED = ".json.gz, .jsonl.zst, .jsonl, .parquet or .arrow"


def discover_shards(specs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Location]:
    """Expand files, folders, globs and URLs into a sorted, de-duplicated list of input shards: local
    ones as ``Path`` (sorted as before URLs were accepted), then URLs (``engine.data.locations``)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    found: set[Location] = set()
    for spec in specs:
        text = os.fspath(spec)
        if is_url(text):
            found.update(expand_url(text, is_supported))
            continue
        path = Path(text)
        if path.is_dir():
            saved = saved_dataset_files(lambda name, folder=path: (folder / name).read_bytes(), text)
            if saved is not None:  # a datasets save_to_disk folder: its data files, nothing else in it
                matches = [path / name for name in saved]
            else:
                matches = [p for p in path.rglob("*") if p.is_file() and is_supported(p)]
            if not matches:
                raise UserError(f"no {SUPPORTED} files in folder {text}")
        elif path.is_file():
            if not is_supported(path):
                raise UserError(f"{text}: unsupported file type (expected {SUPPORTED})")
            matches = [path]
        elif glob.has_magic(text):
            matches = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
            matches = [p for p in matches if is_supported(p)]
            if not matches:
                raise UserError(f"no input files match {text}")
        else:
            raise UserError(f"input not found: {text}")
        found.update(p.resolve() for p in matches)
    return sort_locations(found)


def shard_labels(paths: Sequence[Location]) -> list[str]:
    """Stable, unique names for shards: the path relative to the inputs' common folder.

    Used to name per-shard outputs and to seed per-document hashes, so they must not depend on where the
    corpus is mounted.
    """
    if not paths:
        return []
    if len(paths) == 1:
        return [paths[0].name if isinstance(paths[0], Path) else paths[0].rstrip("/").rsplit("/", 1)[-1]]
    if all(isinstance(p, Path) for p in paths):
        common = Path(os.path.commonpath([str(p.parent) for p in paths]))
        return [p.relative_to(common).as_posix() for p in paths]
    # URLs (or a mix): the same rule on the parts of each location, the scheme being the first part
    parts = [list(p.parts) if isinstance(p, Path) else p.split("/") for p in paths]
    shared = 0
    while all(len(q) > shared + 1 and q[shared] == parts[0][shared] for q in parts):
        shared += 1
    return ["/".join(q[shared:]) for q in parts]


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


def iter_raw_lines(path: Location, position: ReadPosition | None = None) -> Iterator[bytes]:
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


def parse_document(raw: bytes, skips: SkipCounts, text_field: str = DEFAULT_TEXT_FIELD
                   ) -> tuple[dict[str, Any], str] | None:
    """The JSON object and its text (``text_field``), or ``None`` after counting why the line was skipped."""
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
    text = record.get(text_field) if isinstance(record, dict) else None
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

    path: Location
    line: int
    text: str
    record: dict[str, Any] = field(repr=False)


def read_documents(paths: Iterable[Location], skips: SkipCounts | None = None,
                   text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[Document]:
    """Stream the documents of every shard in ``paths``, counting skipped lines into ``skips``."""
    skips = skips if skips is not None else SkipCounts()
    for path in paths:
        path = as_location(path)
        found = format_of(path)
        if found is not None and found.rows:
            from engine.data.columnar import iter_documents

            for row, text, record in iter_documents(path, found.rows, skips, text_field):
                yield Document(path=path, line=row, text=text, record=record)
            continue
        for line, raw in enumerate(iter_raw_lines(path)):
            parsed = parse_document(raw, skips, text_field)
            if parsed is not None:
                record, text = parsed
                yield Document(path=path, line=line, text=text, record=record)


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


def iter_text_records(path: Location, skips: SkipCounts, tally: ReadTally,
                      text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[tuple[int, str, str]]:
    """(line, text, source or "") of every valid document of ``path``: the hot path of ``select``.

    Only the two fields the selection needs leave this function; the whole line is copied later,
    byte for byte, by the writer. Line-at-a-time orjson measured faster here than decoding whole
    blocks (orjson on a JSON array, msgspec's ``decode_lines``); see bench/bench_read.py. A columnar
    file decodes only its text and ``source`` columns (``engine.data.columnar``).
    """
    found = format_of(path)
    if found is not None and found.rows:
        from engine.data.columnar import iter_text_records as iter_rows

        yield from iter_rows(path, found.rows, skips, tally, text_field)
        return
    for line, raw in enumerate(iter_raw_lines(path, tally.position)):
        tally.lines = line + 1
        tally.line_bytes += len(raw) + 1
        parsed = parse_document(raw, skips, text_field)
        if parsed is not None:
            source = parsed[0].get("source")
            yield line, parsed[1], source if isinstance(source, str) else ""
