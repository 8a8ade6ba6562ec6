"""What every command shares: turning library errors into one line, and parsing common flag shapes.

Library errors become CLI errors here, in one place (sqlite-utils style): a ``UserError`` prints one
line on stderr and exits with status 2; a failure of the machine (a full disk, a read-only folder) one
line and status 1; Ctrl-C prints where to resume and exits with 130.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import typer
from rich.console import Console

from engine.errors import ReportedError, UserError, describe_machine_error, is_machine_error

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
console = Console(highlight=False)

F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 2) -> NoReturn:
    from rich.markup import escape

    # escaped: a message may quote brackets (pip install 'blissctl[scale]') that rich would take for markup
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def handles_user_errors(command: F) -> F:
    """Decorate a command so that ``UserError`` is one line and Ctrl-C is a clean exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ReportedError as error:
            raise typer.Exit(error.code) from None
        except UserError as error:
            fail(str(error))
        except OSError as error:
            if not is_machine_error(error):
                raise  # a bug: keep its traceback
            fail(describe_machine_error(error), code=1)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: what was written is kept; run again with --resume")
            sys.stderr.flush()
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def run_blissctl_stage(argv: list[str]) -> int:
    """Run one stage of an experiment as its own ``blissctl`` process (as a user would), its output
    straight to the terminal; the stage dies with this process (``kill -9`` of the experiment leaves
    nothing running, and ``--resume`` finds each stage as it was left)."""
    import os
    import signal
    import subprocess

    from engine.runtime import die_with_parent

    parent = os.getpid()
    return subprocess.run([sys.executable, "-m", "blissctl", *argv],
                          preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM)).returncode

