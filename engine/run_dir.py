"""The run directory: the contract between stages, the dashboard and every report.

Layout (``runs/<name>/``): ``config.json`` (every stage's config with the project version and seed),
``events.jsonl`` (append-only, one JSON object a line, flushed as written), ``checkpoints/``,
``scores/``, ``selected/``, ``report/``. Everything but the event log is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from engine import __version__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""What ``open()`` would have given: mkstemp's private 0600 is wrong for outputs others read."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary file beside ``path`` (any library that wants a path), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB blocks: identifies a checkpoint or tokenizer in manifests."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as plain JSON-able data (paths become strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(config)


class EventLog:
    """Append-only ``events.jsonl``: every line has ``ts``, ``stage`` and ``kind``, then the figures.

    Lines are written whole with one ``write`` on an ``O_APPEND`` descriptor and flushed at once, so a
    reader tailing the file sees complete lines (or, after a crash, at most one half-written last line).
    """

    def __init__(self, path: Path, stage: str, enabled: bool = True):
        self.path = path
        self.stage = stage
        self.enabled = enabled
        self._fd: int | None = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, kind: str, **figures: Any) -> None:
        if self._fd is None:
            return
        record = {"ts": round(time.time(), 3), "stage": self.stage, "kind": kind, **figures}
        os.write(self._fd, orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunDir:
    """``runs/<name>/`` and the well-known paths inside it."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def named(cls, name: str, runs_dir: Path | str = "runs") -> RunDir:
        return cls(Path(runs_dir) / name)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def selected(self) -> Path:
        return self.root / "selected"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def events(self, stage: str, enabled: bool = True) -> EventLog:
        return EventLog(self.events_path, stage, enabled=enabled)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            return {}
        return orjson.loads(self.config_path.read_bytes())

    def record_config(self, stage: str, config: Any, seed: int | None = None) -> None:
        """Store ``config`` under ``stage`` in ``config.json`` (other stages' entries are kept)."""
        data = self.read_config()
        data["version"] = __version__
        entry = config_to_dict(config)
        if seed is not None:
            entry.setdefault("seed", seed)
        data[stage] = entry
        atomic_write_json(self.config_path, data)
