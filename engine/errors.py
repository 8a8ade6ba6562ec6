"""The one exception type users can cause.

The CLI turns a ``UserError`` into one line on stderr and exit status 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: a bad flag, a missing path, a corrupt input file."""


class CorruptInputError(UserError):
    """A compressed input ended early or is not what its name says; names the file and line reached."""

    def __init__(self, path, line: int, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}: {reason} (after line {line})")
