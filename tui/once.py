"""``blissctl dashboard --once``: one rich summary per run, for logs and terminals without a TUI.

An experiment folder prints its rounds table and per-round results; when two or more of the sources
have pretraining evaluations, a last table compares their validation loss at equal tokens.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from tui.compare import overlay_series
from tui.events import EventTail
from tui.experiment import ExperimentState, read_experiment
from tui.render import comparison_table, experiment_summary, run_summary
from tui.runs import RunSource
from tui.state import RunState


def load_run(source: RunSource) -> RunState:
    """Fold every event the run's log holds now, a slice at a time: memory stays flat however long the
    log is (a 200 MB log is folded in 1 MB reads, never held whole)."""
    run = RunState(source.name, source.path)
    tail = EventTail(source.events_path)
    while True:
        batch = tail.read()
        run.fold_batch(batch)
        run.exists = batch.exists
        if not batch.more:
            return run


def load_source(source: RunSource) -> RunState | ExperimentState:
    if source.is_experiment:
        experiment = read_experiment(source.path)
        experiment.name = source.name
        return experiment
    return load_run(source)


def print_summaries(sources: list[RunSource], console: Console) -> list[RunState | ExperimentState]:
    views = [load_source(source) for source in sources]
    for view in views:
        console.print(experiment_summary(view) if isinstance(view, ExperimentState) else run_summary(view))
    series, hidden = overlay_series(views)
    if len(series) > 1:
        console.print(Text("validation loss against tokens", style="bold"))
        console.print(comparison_table(series))
        if hidden:
            console.print(Text(f"{hidden} more runs with evaluations not shown", style="dim"))
    return views
