"""The exceptions users can cause, and how an operating-system failure reads as one line.

The CLI turns a ``UserError`` into one line on stderr and exit status 2, and an ``OSError`` the
machine caused (a full disk, a read-only folder, a permission) into one line and exit status 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem the user can fix: a bad flag, a missing path, a corrupt input file."""


class CorruptInputError(UserError):
    """A compressed input ended early or is not what its name says; names the file and line reached."""

    def __init__(self, path, line: int, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}: {reason} (after line {line})")


class ReportedError(UserError):
    """A failure already explained to the user in one line (by a child process): the CLI exits with
    ``code`` and prints nothing more."""

    def __init__(self, message: str, code: int = 2):
        self.code = code
        super().__init__(message)


MACHINE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
}
"""OS errors that come from the machine, not from a bug: reported as one line."""

_ADVICE = {
    errno.ENOSPC: "free some space, then run the same command with --resume (what was written before is intact)",
    errno.EDQUOT: "free some space, then run the same command with --resume (what was written before is intact)",
    errno.EROFS: "choose a writable --runs-dir",
    errno.EACCES: "choose a folder you can write to (--runs-dir)",
}


def is_machine_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in MACHINE_ERRNOS


def describe_machine_error(error: OSError) -> str:
    """``runs/x/scores/a.npz: no space left on the device; free some space, then …``."""
    what = MACHINE_ERRNOS.get(error.errno) or error.strerror or str(error)
    where = f"{error.filename}: " if error.filename else ""
    advice = _ADVICE.get(error.errno)
    return f"{where}{what}" + (f"; {advice}" if advice else "")


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when it has none), at most ``limit`` characters:
    what a one-line error quotes of a library's own message."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
