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


def stage_process_args(argv: list[str]) -> dict:
    """How an experiment's stage starts: ``python -m blissctl ARGV``, as a user would run it, dying with
    this process (``kill -9`` of the experiment leaves nothing running, and ``--resume`` finds each
    stage as it was left). Keyword arguments of ``subprocess.run`` / ``Popen``."""
    import os
    import signal

    from engine.runtime import die_with_parent

    parent = os.getpid()
    return {"args": [sys.executable, "-m", "blissctl", *argv],
            "preexec_fn": lambda: die_with_parent(parent, signal.SIGTERM)}


def run_blissctl_stage(argv: list[str]) -> int:
    """Run one stage of an experiment as its own ``blissctl`` process (``stage_process_args``), its
    output straight to the terminal."""
    import subprocess

    return subprocess.run(**stage_process_args(argv)).returncode


def run_blissctl_stages_beside(runs, log_dir) -> list:
    """Run experiment stages (``(Stage, argv)`` pairs) at once, each as its own ``blissctl`` process as
    ``run_blissctl_stage`` runs one. Their output goes to ``log_dir/RUN.COMMAND.log`` (two live progress
    displays cannot share a terminal) and is printed whole once each ends; meanwhile one line a stage
    shows how far it is, from its run directory's events as the dashboard folds them. Each stage's own
    CPU-seconds come from ``wait4``."""
    import os
    import subprocess
    import threading
    import time
    from pathlib import Path

    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.experiment import StageExit
    from tui.events import EventTail
    from tui.state import RunState

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    # The children write to files, so rich there sees no terminal: give it this one's width for its tables.
    env = {**os.environ, "COLUMNS": str(console.width)}
    logs, exits = [], [None] * len(runs)

    def reap(index: int, process: subprocess.Popen, began: float) -> None:
        _, status, usage = os.wait4(process.pid, 0)
        # Popen must learn that the child is reaped, or it would wait for it (and warn) when collected.
        process.returncode = os.waitstatus_to_exitcode(status)
        exits[index] = StageExit(process.returncode, time.perf_counter() - began, usage.ru_utime + usage.ru_stime)

    reapers = []
    for index, (stage, argv) in enumerate(runs):
        log = log_dir / f"{stage.run_dir.name}.{argv[0]}.log"
        logs.append(log)
        with open(log, "wb") as out:
            process = subprocess.Popen(**stage_process_args(argv), stdout=out, stderr=subprocess.STDOUT, env=env)
        reaper = threading.Thread(target=reap, args=(index, process, time.perf_counter()), daemon=True)
        reaper.start()
        reapers.append(reaper)

    # A run directory holds other stages' events too (eval's is the pretrain run's): follow the command's own.
    followed = [(EventTail(stage.run_dir / "events.jsonl"), RunState(stage.run_dir.name), argv[0])
                for stage, argv in runs]
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            tasks = [progress.add_task(escape(f"{argv[0]} {stage.run_dir.name}"), total=1.0) for stage, argv in runs]
            while any(reaper.is_alive() for reaper in reapers):
                for task, (tail, state, command), exit in zip(tasks, followed, exits, strict=True):
                    state.fold_batch(tail.read())
                    stage_state = state.stages.get(command)
                    fraction = 1.0 if exit is not None else (stage_state.fraction if stage_state else None)
                    progress.update(task, completed=fraction or 0.0)
                time.sleep(0.5)
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached the stages too: let them keep what they wrote
        for reaper in reapers:
            reaper.join()
        raise
    for (stage, argv), log in zip(runs, logs, strict=True):
        console.rule(f"[dim]{escape(argv[0])} {escape(stage.run_dir.name)}: its output ({log})[/]",
                     characters="·", style="dim")
        console.out(log.read_text(errors="replace").rstrip("\n"), highlight=False)
    return exits
