"""``blissctl dashboard --once``: one rich summary per run, for logs and terminals without a TUI."""

from __future__ import annotations

from rich.console import Console

from tui.events import read_all
from tui.render import run_summary
from tui.runs import RunSource
from tui.state import RunState


def load_run(source: RunSource) -> RunState:
    """Fold every event the run's log holds now."""
    run = RunState(source.name, source.path)
    batch = read_all(source.events_path)
    run.exists = batch.exists
    run.bad_lines = batch.bad_lines
    run.fold_all(batch.events)
    return run


def print_summaries(sources: list[RunSource], console: Console) -> list[RunState]:
    runs = [load_run(source) for source in sources]
    for run in runs:
        console.print(run_summary(run))
    return runs
