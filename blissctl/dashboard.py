"""Watch runs live: stages with progress, rate and ETA; loss curves; score histogram; throughput.

Reads only each run's events.jsonl, so it can sit beside a long run or start before it (it waits).
An experiment folder (experiment.json, from blissctl rounds) shows its rounds as rows of stages and
its validation loss joined across rounds. Runs named side by side are overlaid on one chart of
validation loss against tokens as soon as two have one (c toggles the overlay).

Keys: q quit, tab next run, c compare, p pause following, ? help.

With --once, prints a summary of each run (an experiment's rounds table and per-round results) and
exits: for logs and terminals without a TUI.

Example: blissctl dashboard c4-random --runs-dir runs

Example, an experiment's rounds, live: blissctl dashboard runs/bliss-rounds

Example, BLISS against random on one chart: blissctl dashboard runs/demo-bliss-lm runs/demo-random-lm

Example, two experiments printed: blissctl dashboard bliss-rounds random-rounds --once
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blissctl.common import console, handles_user_errors
from engine.errors import UserError
from tui.runs import RunSource, discover_runs, run_source


@handles_user_errors
def dashboard_command(
    runs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Runs to show: names under --runs-dir or paths to run directories or experiment folders. "
            "Default: every run and experiment under --runs-dir, newest first (runs started later appear "
            "as they do). Two or more are overlaid on one validation-loss chart once two have curves.",
            show_default=False,
            metavar="RUN",
        ),
    ] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where named runs live.")] = Path("runs"),
    once: Annotated[
        bool, typer.Option("--once", help="Print a summary of each run and exit instead of the live view.")
    ] = False,
    refresh: Annotated[
        float, typer.Option("--refresh", help="Seconds between looks at each events.jsonl (live view).")
    ] = 0.25,
) -> None:
    if not 0.01 <= refresh <= 60:
        raise UserError(f"--refresh must be between 0.01 and 60 seconds, got {refresh}")
    sources = [run_source(argument, runs_dir) for argument in runs or []]
    sources = _unique_names(sources)

    if once:
        from tui.once import print_summaries

        if not runs:
            sources = discover_runs(runs_dir)
            if not sources:
                raise UserError(f"no runs under {runs_dir}/ (name one, or point --runs-dir elsewhere)")
        missing = [str(source.path) for source in sources if not source.path.is_dir()]
        if missing:
            raise UserError(f"no run directory at {', '.join(missing)}")
        print_summaries(sources, console)
        return

    # Textual loads only for the live view: `--once` and `blissctl --help` stay quick.
    from tui.app import run_dashboard

    # Named side by side, runs are there to be compared: the overlay shows itself once two of them have
    # validation curves (c toggles it).
    run_dashboard(sources, discover_root=None if runs else runs_dir, refresh_s=refresh, compare=len(sources) > 1)


def _unique_names(sources: list[RunSource]) -> list[RunSource]:
    """A run named twice is followed once; two runs with one directory name (from different paths) are
    told apart by their path."""
    seen_paths: set[Path] = set()
    seen_names: set[str] = set()
    unique = []
    for source in sources:
        if source.path.resolve() in seen_paths:
            continue
        if source.name in seen_names:
            source = RunSource(str(source.path), source.path)
        seen_paths.add(source.path.resolve())
        seen_names.add(source.name)
        unique.append(source)
    return unique
