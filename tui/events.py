"""Reading ``events.jsonl`` while a stage is still writing it.

The writer (``engine.run_dir.EventLog``) appends whole lines, but a reader can still meet a
half-written last line (a crash, or a read that lands between two writes), a file that is truncated
and rewritten (a stage started again), or one replaced by a new file (a new inode). ``EventTail``
turns all of that into batches of parsed ``Event`` s plus a ``restarted`` flag that tells the state
to forget what it had, and never raises for anything inside the file. Nothing here imports Textual,
so ``--once`` and the tests use it directly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

MAX_READ_BYTES = 1 << 20
"""Bytes read per ``EventTail.read`` call: bounds the work per batch, so a huge backlog is folded in
slices and the screen keeps refreshing between them."""

MAX_LINE_BYTES = 1 << 20
"""A "line" longer than this without a newline is garbage, not an event: it is dropped, not kept."""

HEAD_BYTES = 64
"""Bytes at the start of the file compared on every growth to notice a rewrite that is not shorter."""


@dataclass(frozen=True, slots=True)
class Event:
    """One line of ``events.jsonl``: ``ts``, ``stage`` and ``kind`` pulled out, every field in ``data``."""

    ts: float | None
    stage: str
    kind: str
    data: dict[str, Any]

    def number(self, name: str) -> float | None:
        """The field ``name`` as a finite float, or ``None`` when absent or not a number."""
        return as_number(self.data.get(name))


@dataclass(frozen=True, slots=True)
class TailBatch:
    """What one ``EventTail.read`` found."""

    events: list[Event] = field(default_factory=list)
    restarted: bool = False
    """The file was truncated or replaced: events folded before this batch no longer describe it."""
    bad_lines: int = 0
    exists: bool = True
    more: bool = False
    """More bytes were waiting than one read takes: read again without sleeping."""


def as_number(value: Any) -> float | None:
    """``value`` as a finite float; ``None`` for missing, non-numeric, bool, NaN or infinite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def parse_event(line: bytes) -> Event | None:
    """One line as an ``Event``; ``None`` when it is not a JSON object (garbage, bad UTF-8, a list)."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    stage = record.get("stage")
    kind = record.get("kind")
    return Event(
        ts=as_number(record.get("ts")),
        stage=stage if isinstance(stage, str) and stage else "?",
        kind=kind if isinstance(kind, str) and kind else "?",
        data=record,
    )


class EventTail:
    """Follows one ``events.jsonl``: each ``read`` returns the complete lines added since the last.

    The file may not exist yet (a run that has not started): ``read`` then returns an empty batch with
    ``exists=False`` and tries again next time.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._identity: tuple[int, int] | None = None
        self._head = b""
        self._offset = 0
        self._partial = b""
        self._discarding_long_line = False

    def read(self) -> TailBatch:
        try:
            stat = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            # A replaced file may briefly be missing; keep what we have until a new one appears.
            return TailBatch(exists=False)
        except OSError:
            return TailBatch(exists=False)
        restarted = False
        identity = (stat.st_dev, stat.st_ino)
        if self._identity is not None and (identity != self._identity or stat.st_size < self._offset):
            restarted = True
            self._forget()
        self._identity = identity
        if stat.st_size == self._offset:
            return TailBatch(restarted=restarted)
        try:
            with open(self.path, "rb") as file:
                if self._head and file.read(len(self._head)) != self._head:
                    # Rewritten in place to at least its old length: the first line (and its ts) differ.
                    restarted = True
                    self._forget()
                    self._identity = identity
                file.seek(self._offset)
                chunk = file.read(MAX_READ_BYTES)
        except OSError:
            return TailBatch(restarted=restarted, exists=False)
        if self._offset < HEAD_BYTES:
            self._head = (self._head + chunk)[:HEAD_BYTES]
        self._offset += len(chunk)
        events, bad_lines = self._split(chunk)
        return TailBatch(
            events=events, restarted=restarted, bad_lines=bad_lines, more=self._offset < stat.st_size
        )

    def _forget(self) -> None:
        self._identity = None
        self._head = b""
        self._offset = 0
        self._partial = b""
        self._discarding_long_line = False

    def _split(self, chunk: bytes) -> tuple[list[Event], int]:
        lines = (self._partial + chunk).split(b"\n")
        # The last piece has no newline yet: a line still being written, completed by a later read.
        self._partial = lines.pop()
        events: list[Event] = []
        bad_lines = 0
        for line in lines:
            if self._discarding_long_line:
                # The tail end of an over-long line dropped earlier.
                self._discarding_long_line = False
                bad_lines += 1
                continue
            line = line.strip()
            if not line:
                continue
            event = parse_event(line)
            if event is None:
                bad_lines += 1
            else:
                events.append(event)
        if len(self._partial) > MAX_LINE_BYTES:
            self._partial = b""
            self._discarding_long_line = True
        return events, bad_lines


def read_all(path: Path | str) -> TailBatch:
    """Every complete event in the file now (for ``--once`` and tests): reads until caught up."""
    tail = EventTail(path)
    events: list[Event] = []
    bad_lines = 0
    while True:
        batch = tail.read()
        events.extend(batch.events)
        bad_lines += batch.bad_lines
        if not batch.more:
            return TailBatch(events=events, bad_lines=bad_lines, exists=batch.exists)
