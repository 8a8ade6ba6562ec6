"""The run directory: the contract between stages, the dashboard and every report.

Layout (``runs/<name>/``): ``config.json`` (every stage's config with the project version and seed),
``events.jsonl`` (append-only, one JSON object a line, flushed as written), ``checkpoints/``,
``scores/``, ``selected/``, ``report/``. Everything but the event log is written atomically.

This module owns the run directory: what a run may be called (one path component, so nothing is ever
written outside ``runs/<name>/``), who may write it (``RunLock``: one stage at a time, released by the
kernel when the holder dies, so a ``kill -9`` never leaves a stale lock), how a stage opens and closes
it (``RunDir.stage``: the lock, the event log, and an ``error`` or ``interrupted`` event whatever
stops it), and what ``--force`` may remove (the names a stage writes, never anything else).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from engine import __version__
from engine.errors import UserError, describe_machine_error, is_machine_error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""What ``open()`` would have given: mkstemp's private 0600 is wrong for outputs others read."""

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A run name: one folder name of safe characters (so ``..``, ``a/b``, ``/abs`` and ``''`` are refused)."""

LOCK_FILE = ".lock"
LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}
TRAINER_LOCK_FILE = ".trainer.lock"


def check_run_name(name: str, flag: str = "--run") -> str:
    """``name`` if it is a valid run name, else a one-line error naming ``flag``."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise UserError(
            f"{flag} {name!r}: a run name is one folder name of letters, digits, '.', '_' and '-' "
            "(not starting with '.', at most 128 characters); use --runs-dir to put runs elsewhere"
        )
    return name


def run_path(argument: str, runs_dir: Path | str) -> Path:
    """A run (or experiment) named on the command line: the path itself when a folder is there or it
    looks like a path, else the run of that name under ``runs_dir``."""
    as_path = Path(argument)
    if as_path.is_dir() or "/" in argument or argument.startswith("."):
        return as_path
    return Path(runs_dir) / argument


def _with_filename(error: OSError, path: Path) -> OSError:
    """The machine's error, naming the file we were writing (a write on a descriptor names none)."""
    if error.filename is None:
        error.filename = str(path)
    return error


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary file beside ``path`` (any library that wants a path), then rename.

    Readers see the old file or the new one, never half of it; on any failure the temporary file is
    removed and the old file, if any, is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise _with_filename(error, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it."""
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def json_bytes(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


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


INT64_MAX = (1 << 63) - 1


def check_config_integers(config: Any) -> None:
    """Every integer field of a config dataclass fits in 64 bits (JSON, numpy and torch need it).

    Called from the configs' ``__post_init__``, so an absurd ``--seed 2**64`` is a one-line error
    before anything is written.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX <= value <= INT64_MAX:
            raise UserError(f"--{f.name.replace('_', '-')} {value}: too large (at most {INT64_MAX})")


class TensorBoardMirror:
    """The numeric figures of every event that has a ``step``, as TensorBoard scalars in
    ``runs/<name>/tensorboard/<stage>/`` (what litgpt and torchtitan users point ``tensorboard --logdir``
    at). Tags: ``stage/name`` for ``step`` events, ``stage/kind/name`` for the others (``pretrain/eval/loss_val``)."""

    def __init__(self, folder: Path, stage: str):
        from torch.utils.tensorboard import SummaryWriter  # only stages that train import this

        self.stage = stage
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, kind: str, figures: dict[str, Any]) -> None:
        step = figures.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        prefix = self.stage if kind == "step" else f"{self.stage}/{kind}"
        for name, value in figures.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        self.writer.close()


class EventLog:
    """Append-only ``events.jsonl``: every line has ``ts``, ``stage`` and ``kind``, then the figures.

    Lines are written whole with one ``write`` on an ``O_APPEND`` descriptor and flushed at once, so a
    reader tailing the file sees complete lines (or, after a crash, at most one half-written last line).
    A ``TensorBoardMirror`` sees the same events.
    """

    def __init__(self, path: Path, stage: str, enabled: bool = True, mirror: TensorBoardMirror | None = None):
        self.path = path
        self.stage = stage
        self.enabled = enabled
        self.mirror = mirror
        self._fd: int | None = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, kind: str, **figures: Any) -> None:
        if self._fd is None:
            return
        record = {"ts": round(time.time(), 3), "stage": self.stage, "kind": kind, **figures}
        try:
            os.write(self._fd, orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        except OSError as error:
            raise _with_filename(error, self.path) from None
        if self.mirror is not None:
            self.mirror.write(kind, figures)

    def emit_if_possible(self, kind: str, **figures: Any) -> None:
        """Emit, unless the disk or the figures make that impossible: used on the way out of a failure,
        where the failure itself is what the user must see."""
        with contextlib.suppress(OSError, TypeError, orjson.JSONEncodeError):
            self.emit(kind, **figures)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunLock:
    """An exclusive ``flock`` on a lock file of the run: one writer at a time.

    The kernel releases a ``flock`` when its holder's last descriptor closes, a process killed with
    ``kill -9`` included, so there is never a stale lock to clean up. The holder writes its pid and
    stage into the file so that a second writer can say who is in the way.
    """

    def __init__(self, path: Path, stage: str):
        self.path = path
        self.stage = stage
        self._fd: int | None = None

    def acquire(self, *, wait_s: float = 0.0) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno in LOCKS_UNSUPPORTED:  # a file system without locks: nothing to enforce with
                    break
                if not isinstance(error, BlockingIOError):
                    os.close(fd)
                    raise _with_filename(error, self.path) from None
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise UserError(
                        f"run {self.path.parent} is in use by {holder}; wait for it to finish or choose another --run"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps({"pid": os.getpid(), "stage": self.stage, "since": round(time.time(), 3)}), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = orjson.loads(os.pread(fd, 4096, 0))
            return f"{info['stage']} (pid {info['pid']})"
        except Exception:  # written a moment ago and not yet filled in, or not ours
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class StageSession:
    """A stage at work in its run: holds the lock and the event log, reports whatever stops it.

    On the way out of an exception it appends an ``error`` event (with the one-line message the CLI
    prints, and ``interrupted: true`` for Ctrl-C) unless the stage already did, then releases the lock.
    ``figures`` are added to that last event (e.g. the step a training run reached).
    """

    def __init__(self, events: EventLog, lock: RunLock | None):
        self.events = events
        self.lock = lock
        self.figures: dict[str, Any] = {}

    def emit(self, kind: str, **figures: Any) -> None:
        self.events.emit(kind, **figures)

    def close(self, error: BaseException | None) -> None:
        try:
            if error is not None:
                interrupted = isinstance(error, KeyboardInterrupt)
                message = "interrupted; run again with --resume" if interrupted else failure_message(error)
                self.events.emit_if_possible("error", message=message, interrupted=interrupted, **self.figures)
        finally:
            self.events.close()
            if self.lock is not None:
                self.lock.release()


def failure_message(error: BaseException) -> str:
    """The one line a user sees for ``error`` (the CLI prints the same)."""
    if is_machine_error(error):
        return describe_machine_error(error)  # type: ignore[arg-type]
    if isinstance(error, UserError):
        return str(error)
    return f"{type(error).__name__}: {error}"


# What each stage writes, by name, inside its run: the only things --force and demo --force remove.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "select": ("scores/*.scores.npz", "selected/*.jsonl.zst", "selected/manifest.json", "report/select.md",
               "report/select.json", "dsir-model.npz", "dsir-model.json",
               # --output-format parquet and megatron (its parts while writing)
               "selected/*.parquet", "selected/*.bin", "selected/*.idx", "selected/parts/*.bin",
               "selected/parts/*.sizes",
               # independent shard jobs' done markers and locks (engine.select.shards)
               "scores/shares/*.done.json", "scores/shares/*.lock"),
}
RUN_OUTPUTS = (
    "config.json", "events.jsonl", "tokenizer.json", "pretrain_config.json", LOCK_FILE, TRAINER_LOCK_FILE,
    "dsir-model.npz", "dsir-model.json",
    "scores/*.scores.npz", "scores/shares/*.done.json", "scores/shares/*.lock", "selected/*.jsonl.zst",
    "selected/manifest.json", "report/*.md", "report/*.json",
    "selected/*.parquet", "selected/*.bin", "selected/*.idx", "selected/parts/*.bin", "selected/parts/*.sizes",
    "checkpoints/**", "data/**", "tensorboard/**", "hf/**", "decayed/**",
)


class RunDir:
    """``runs/<name>/`` and the well-known paths inside it."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def named(cls, name: str, runs_dir: Path | str = "runs", *, flag: str = "--run") -> RunDir:
        """The run called ``name`` under ``runs_dir``; a one-line error unless ``name`` is one safe folder name."""
        return cls(Path(runs_dir) / check_run_name(name, flag))

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
    def decayed(self) -> Path:
        """``pretrain --decay-steps``'s evaluation branch: a checkpoint folder of its own (its
        ``checkpoints/``), so that ``eval --checkpoint runs/<name>/decayed`` finds it."""
        return self.root / "decayed"

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

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def events(self, stage: str, enabled: bool = True, tensorboard: bool = False) -> EventLog:
        """The event log for ``stage``; with ``tensorboard`` its figures also go to TensorBoard files."""
        mirror = TensorBoardMirror(self.tensorboard / stage, stage) if enabled and tensorboard else None
        return EventLog(self.events_path, stage, enabled=enabled, mirror=mirror)

    def lock(self, stage: str, *, name: str = LOCK_FILE, wait_s: float = 0.0) -> RunLock:
        """Take the run's lock for ``stage`` (a one-line error naming the holder if it is taken)."""
        self.create()
        return RunLock(self.root / name, stage).acquire(wait_s=wait_s)

    def open_stage(self, stage: str, *, main: bool = True, lock: bool = True, lock_name: str = LOCK_FILE,
                   wait_s: float = 0.0, tensorboard: bool = False) -> StageSession:
        """Start ``stage`` in this run: its lock (on the main rank) and event log (mirrored to TensorBoard
        with ``tensorboard``). Close the session with ``session.close(error_or_None)``; ``stage()`` is the
        same as a ``with`` block."""
        held = self.lock(stage, name=lock_name, wait_s=wait_s) if main and lock else None
        try:
            events = self.events(stage, enabled=main, tensorboard=tensorboard)
        except BaseException:
            if held is not None:
                held.release()
            raise
        return StageSession(events, held)

    @contextlib.contextmanager
    def stage(self, stage: str, *, main: bool = True, lock: bool = True, lock_name: str = LOCK_FILE,
              wait_s: float = 0.0, tensorboard: bool = False) -> Iterator[StageSession]:
        """Run ``stage`` in this run: lock (on the main rank), event log, and a last event on failure.

        Other ranks of a torchrun job (``main=False``) get a session whose event log writes nothing.
        """
        session = self.open_stage(stage, main=main, lock=lock, lock_name=lock_name, wait_s=wait_s,
                                  tensorboard=tensorboard)
        try:
            yield session
        except BaseException as error:
            session.close(error)
            raise
        session.close(None)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            return {}
        try:
            data = orjson.loads(self.config_path.read_bytes())
        except orjson.JSONDecodeError:
            raise UserError(f"{self.config_path} is not valid JSON; remove it or choose another --run") from None
        return data if isinstance(data, dict) else {}

    def record_config(self, stage: str, entry: Any, seed: int | None = None) -> None:
        """Store ``entry`` (a config dataclass or a dict) under ``stage`` in ``config.json``; other
        stages' entries are kept. The one writer of ``config.json``."""
        data = self.read_config()
        data["version"] = __version__
        entry = config_to_dict(entry) if dataclasses.is_dataclass(entry) else dict(entry)
        if seed is not None:
            entry.setdefault("seed", seed)
        data[stage] = entry
        atomic_write_json(self.config_path, data)

    def forget_stage(self, stage: str) -> None:
        """Remove ``stage``'s entry from ``config.json`` (after its outputs were discarded)."""
        data = self.read_config()
        if stage in data:
            del data[stage]
            atomic_write_json(self.config_path, data)

    def discard(self, patterns: Iterable[str]) -> int:
        """Remove the files this run wrote that match ``patterns`` (relative to the run), then the
        folders they leave empty; returns how many files went.

        Only names the stages write are ever given here, so ``--force`` cannot remove anything a user
        put beside or inside a run. Symbolic links are removed as links, never followed.
        """
        removed = 0
        folders: set[Path] = set()
        for pattern in patterns:
            for path in self._matches(pattern):
                if path.is_symlink() or path.is_file():
                    path.unlink()
                    removed += 1
                    folders.add(path.parent)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and folder.is_relative_to(self.root):
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    break
                folder = folder.parent
        return removed

    def _matches(self, pattern: str) -> list[Path]:
        if pattern.endswith("/**"):  # a folder the stage owns entirely (checkpoints/, data/)
            top = self.root / pattern[:-3]
            if top.is_symlink():
                return [top]
            if not top.is_dir():
                return []
            found = []
            for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
                found += [Path(dirpath) / name for name in filenames]
                found += [Path(dirpath) / name for name in dirnames if (Path(dirpath) / name).is_symlink()]
            return found
        folder, _, glob = pattern.rpartition("/")
        base = self.root / folder if folder else self.root
        if base.is_symlink() or not base.is_dir():
            return [base] if base.is_symlink() else []
        return [p for p in base.glob(glob)]

    def clear(self) -> int:
        """Remove everything any stage writes in this run (``demo --force``), then the run folder if it
        is left empty."""
        removed = self.discard(RUN_OUTPUTS)
        for folder in ("checkpoints", "data", "scores", "selected", "report", "tensorboard", "hf", "decayed"):
            path = self.root / folder
            if path.is_dir() and not path.is_symlink():
                # Empty folders a stage made (e.g. data/parts/...): remove bottom-up, stop at anything left.
                for dirpath, _, _ in sorted(os.walk(path), key=lambda item: -len(item[0])):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
        with contextlib.suppress(OSError):
            self.root.rmdir()
        return removed
