"""``blissctl dashboard --once``: one rich summary per run, for logs and terminals without a TUI."""

from __future__ import annotations

from rich.console import Console

from tui.events import EventTail
from tui.render import run_summary
from tui.runs import RunSource
from tui.state import RunState


def load_run(source: RunSource) -> RunState:
    """Fold every event the run's log holds now, a slice at a time: memory stays flat however long the
    log is (a 200 MB log is folded in 1 MB reads, never held whole)."""
    run = RunState(source.name, source.path)
    tail = EventTail(source.events_path)
    while True:
        batch = tail.read()
        run.exists = batch.exists
        run.bad_lines += batch.bad_lines
        if batch.restarted:
            run.restart()
        run.fold_all(batch.events)
        if not batch.more:
            return run


def print_summaries(sources: list[RunSource], console: Console) -> list[RunState]:
    runs = [load_run(source) for source in sources]
    for run in runs:
        console.print(run_summary(run))
    return runs
