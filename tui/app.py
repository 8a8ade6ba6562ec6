"""``blissctl dashboard``: a Textual app that follows runs as their stages write ``events.jsonl``.

One thread worker per source tails its log (``EventTail``) and posts ``EventsRead`` messages; the app
folds them into that run's ``RunState`` on its own thread; a timer redraws the shown run when it
changed. An experiment folder is one source: its worker follows the plan and every stage run
(``ExperimentReader``) and posts ``ExperimentRead`` into an ``ExperimentState``.

Three views share the main area: a run (stages, loss curves, histogram, throughput), an experiment
(rounds as rows of stages, the validation loss joined across rounds), and the overlay (``c``) of every
followed source's validation loss against tokens. The worker waits until its last batch was folded before posting another, so a run writing
thousands of events a second fills no queue: it is read in ``MAX_READ_BYTES`` slices at the pace the
app can fold them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer, Header, OptionList
from textual.worker import get_current_worker

from tui.compare import overlay_series, series_of
from tui.events import EventTail, TailBatch
from tui.experiment import ExperimentBatch, ExperimentReader, ExperimentState, is_experiment
from tui.runs import RunSource, discover_runs
from tui.state import PRETRAIN_CURVES, SCORER_CURVES, RunState
from tui.widgets import (
    ActiveStagePanel,
    CompareTable,
    HelpScreen,
    LossChart,
    RoundsPanel,
    RunList,
    ScoreHistogramChart,
    StagesPanel,
    TasksPanel,
    ThroughputPanel,
    TokensLossChart,
)


class EventsRead(Message):
    """A worker read new lines of one run's log (or found it truncated, replaced or missing)."""

    def __init__(self, run: str, batch: TailBatch, folded: threading.Event):
        super().__init__()
        self.run = run
        self.batch = batch
        self.folded = folded


class ExperimentRead(Message):
    """A worker read an experiment folder: a new plan or result, or new lines of its stage runs."""

    def __init__(self, run: str, batch: ExperimentBatch, folded: threading.Event):
        super().__init__()
        self.run = run
        self.batch = batch
        self.folded = folded


class DashboardApp(App[None]):
    TITLE = "blissctl dashboard"
    CSS = """
    #runs { width: 22%; min-width: 16; max-width: 32; height: 1fr; border: round $primary-darken-1; border-title-color: $text; }
    #main { width: 1fr; }
    #stages { height: auto; max-height: 14; border: round $primary-darken-1; padding: 0 1; }
    #curves, #bottom { height: 1fr; }
    #scorer-loss, #pretrain-loss, #histogram { border: round $primary-darken-1; }
    #histogram { width: 2fr; }
    #throughput { width: 1fr; border: round $primary-darken-1; padding: 0 1; }
    #tasks { width: auto; min-width: 36; border: round $primary-darken-1; padding: 0 1; }
    .throughput-sparkline { height: 2; margin-bottom: 1; }
    #run-view, #experiment-view, #compare-view { height: 1fr; }
    #rounds { height: auto; max-height: 24; border: round $primary-darken-1; padding: 0 1; }
    #active-stage { height: auto; max-height: 10; border: round $primary-darken-1; padding: 0 1; }
    #experiment-loss, #overlay { height: 1fr; min-height: 10; border: round $primary-darken-1; }
    #compare-table { height: auto; max-height: 12; border: round $primary-darken-1; padding: 0 1; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        # priority: tab would otherwise move focus between widgets instead of switching runs.
        Binding("tab", "next_run", "Next run", priority=True),
        Binding("shift+tab", "previous_run", "Previous run", show=False, priority=True),
        Binding("p", "toggle_following", "Pause"),
        Binding("c", "toggle_compare", "Compare"),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    def __init__(
        self,
        sources: list[RunSource],
        discover_root: Path | None = None,
        refresh_s: float = 0.25,
        discover_every_s: float = 2.0,
        compare: bool = False,
    ):
        """Follow ``sources``; with ``discover_root``, also pick up run directories that appear there.
        With ``compare``, the overlay of every source's validation loss is shown as soon as two of them
        have one (until ``c`` or choosing a run says otherwise)."""
        super().__init__()
        self.discover_every_s = discover_every_s
        self.sources: list[RunSource] = []
        self.runs: dict[str, RunState | ExperimentState] = {}
        """Each followed source's state: a run's ``RunState``, an experiment folder's ``ExperimentState``."""
        self.compare = False
        """The overlay is shown because the user asked for it (``c``)."""
        self.compare_auto = compare
        """The overlay shows itself once two sources have validation curves: runs named side by side
        are there to be compared, but two select runs have nothing to overlay."""
        self.discover_root = discover_root
        self.refresh_s = refresh_s
        self.selected: str | None = None
        self.following = True
        self._changed: set[str] = set()
        self._pending = list(sources)

    # --- layout ----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            run_list = RunList(id="runs")
            run_list.border_title = "runs"
            yield run_list
            with Vertical(id="main"):
                with Vertical(id="run-view"):
                    stages = StagesPanel(id="stages")
                    stages.border_title = "stages"
                    yield stages
                    with Horizontal(id="curves"):
                        yield LossChart("train-scorer loss", SCORER_CURVES, "train-scorer", id="scorer-loss")
                        yield LossChart("pretrain loss", PRETRAIN_CURVES, "pretrain", id="pretrain-loss")
                        tasks = TasksPanel(id="tasks")
                        tasks.border_title = "zero-shot accuracy, %"
                        yield tasks
                    with Horizontal(id="bottom"):
                        yield ScoreHistogramChart(id="histogram")
                        throughput = ThroughputPanel(id="throughput")
                        throughput.border_title = "throughput"
                        yield throughput
                with Vertical(id="experiment-view"):
                    yield RoundsPanel(id="rounds")
                    yield ActiveStagePanel(id="active-stage")
                    yield TokensLossChart("validation loss across rounds", id="experiment-loss")
                with Vertical(id="compare-view"):
                    yield TokensLossChart("validation loss against tokens", id="overlay")
                    compare_table = CompareTable(id="compare-table")
                    compare_table.border_title = "compared"
                    yield compare_table
        yield Footer()

    def on_mount(self) -> None:
        # Held, not queried on each tick: queries search the active screen, which is the help
        # screen while it is open, and the view goes on following underneath it.
        self._run_list = self.query_one(RunList)
        self._stages_panel = self.query_one(StagesPanel)
        self._curves_row = self.query_one("#curves")
        self._views = list(self.query("#stages, #scorer-loss, #pretrain-loss, #tasks, #histogram, #throughput"))
        self._run_view = self.query_one("#run-view")
        self._experiment_view = self.query_one("#experiment-view")
        self._compare_view = self.query_one("#compare-view")
        self._rounds_panel = self.query_one(RoundsPanel)
        self._active_stage = self.query_one(ActiveStagePanel)
        self._experiment_chart = self.query_one("#experiment-loss", TokensLossChart)
        self._overlay = self.query_one("#overlay", TokensLossChart)
        self._compare_table = self.query_one(CompareTable)
        self._shown_view: str | None = None
        for source in self._pending:
            self._follow(source)
        self._pending.clear()
        if self.discover_root is not None:
            self._discover()
            self.set_interval(self.discover_every_s, self._discover)
        self.set_interval(self.refresh_s, self._redraw)
        self._redraw(force=True)
        self._run_list.focus()

    # --- following runs ----------------------------------------------------------------------------

    def _follow(self, source: RunSource, newest: bool = False) -> None:
        if source.name in self.runs:
            return
        if newest:
            self.sources.insert(0, source)
        else:
            self.sources.append(source)
        experiment = source.is_experiment
        self.runs[source.name] = (ExperimentState if experiment else RunState)(source.name, source.path)
        self._changed.add(source.name)
        if self.selected is None:
            self.selected = source.name
        self._tail(source)

    def _discover(self) -> None:
        assert self.discover_root is not None
        fresh = [source for source in discover_runs(self.discover_root) if source.name not in self.runs]
        if not self.sources:
            for source in fresh:  # newest first, and the newest is shown
                self._follow(source)
        else:
            for source in reversed(fresh):  # runs started while we watch go on top
                self._follow(source, newest=True)

    @work(thread=True, group="tail")
    def _tail(self, source: RunSource) -> None:
        worker = get_current_worker()
        tail = EventTail(source.events_path)
        experiment = ExperimentReader(source.path) if source.is_experiment else None
        existed: bool | None = None
        while not worker.is_cancelled:
            if experiment is None and not existed and is_experiment(source.path):
                # Named (or discovered) before `blissctl rounds` wrote its plan: it is an experiment now.
                experiment = ExperimentReader(source.path)
            message: EventsRead | ExperimentRead | None = None
            if experiment is not None:
                batch: TailBatch | ExperimentBatch = experiment.read()
                if not batch.empty:
                    message = ExperimentRead(source.name, batch, threading.Event())
            else:
                batch = tail.read()
                if batch.events or batch.restarted or batch.bad_lines or batch.exists != existed:
                    existed = batch.exists
                    message = EventsRead(source.name, batch, threading.Event())
            if message is not None:
                self.post_message(message)
                # Wait for the fold before reading on: bounds memory to one batch per source.
                while not message.folded.wait(0.1):
                    if worker.is_cancelled:
                        return
            if not batch.more:
                time.sleep(self.refresh_s)

    def on_events_read(self, message: EventsRead) -> None:
        try:
            run = self.runs.get(message.run)
            if isinstance(run, RunState):
                run.fold_batch(message.batch)
                self._changed.add(message.run)
        finally:
            message.folded.set()

    def on_experiment_read(self, message: ExperimentRead) -> None:
        try:
            view = self.runs.get(message.run)
            if view is None:
                return
            if not isinstance(view, ExperimentState):
                view = self.runs[message.run] = ExperimentState(view.name, view.path)
            view.fold(message.batch)
            self._changed.add(message.run)
        finally:
            message.folded.set()

    # --- drawing -----------------------------------------------------------------------------------

    def _redraw(self, force: bool = False) -> None:
        if not self.following and not force:
            return
        run = self.runs.get(self.selected) if self.selected else None
        view = "compare" if self._comparing() else "experiment" if isinstance(run, ExperimentState) else "run"
        if view != self._shown_view:
            self._run_view.display = view == "run"
            self._experiment_view.display = view == "experiment"
            self._compare_view.display = view == "compare"
            self._shown_view, force = view, True
        if isinstance(run, RunState):
            self._stages_panel.show_freshness(run)
        elif isinstance(run, ExperimentState):
            self._rounds_panel.show_freshness(run)
        if not self._changed and not force:
            return
        names = [source.name for source in self.sources]
        selected_index = names.index(self.selected) if self.selected in names else None
        self._run_list.show_runs([self.runs[name] for name in names], selected_index)
        if view == "compare":
            if force or self._changed:
                self._show_overlay(names)
        elif run is None:
            where = f"under {self.discover_root}/" if self.discover_root is not None else "to follow"
            self._stages_panel.update(Text(f"no runs {where} yet: waiting for one to start", style="dim"))
        elif isinstance(run, ExperimentState):
            if force or run.name in self._changed:
                self._rounds_panel.show_experiment(run)
                self._active_stage.show_experiment(run)
                series = series_of(run)
                self._experiment_chart.show_series(
                    [series] if series else [], "waiting for the pretrain stages' evaluations", rounds=True
                )
        elif force or run.name in self._changed:
            for widget in self._views:
                widget.show_run(run)  # type: ignore[attr-defined]
            # A run that only selects has no loss yet: give its histogram the room until one arrives.
            self._curves_row.display = any(len(curve) for curve in run.curves.values()) or bool(run.tasks)
        self._changed.clear()
        self._update_subtitle()

    def _show_overlay(self, names: list[str]) -> None:
        series, hidden = overlay_series([self.runs[name] for name in names])
        waiting = "waiting for a pretrain evaluation in any run (c shows each run)"
        if len(names) > 1 and not series:
            waiting = f"waiting for a pretrain evaluation in {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
        self._overlay.show_series(series, waiting, hidden=hidden)
        self._compare_table.show_series(series)

    def _update_subtitle(self) -> None:
        shown = self.selected or "no runs yet"
        if self._shown_view == "compare":
            shown = f"compare {len(self.sources)} runs (c: each run)"
        state = "following" if self.following else "PAUSED (p to follow)"
        self.sub_title = f"{shown} · {state}"

    def _select(self, name: str) -> None:
        if name == self.selected:
            return
        self.selected = name
        # Choosing a run in the list asks to see it: the overlay makes way.
        self.compare = self.compare_auto = False
        self._redraw(force=True)

    # --- actions -----------------------------------------------------------------------------------

    def _step_run(self, offset: int) -> None:
        if not self.sources:
            return
        names = [source.name for source in self.sources]
        index = names.index(self.selected) if self.selected in names else 0
        index = (index + offset) % len(names)
        self._run_list.highlighted = index
        self._select(names[index])

    def action_next_run(self) -> None:
        self._step_run(+1)

    def action_previous_run(self) -> None:
        self._step_run(-1)

    def action_toggle_following(self) -> None:
        self.following = not self.following
        if self.following:
            self._redraw(force=True)
        self._update_subtitle()

    def action_toggle_compare(self) -> None:
        self.compare = not self._comparing()
        self.compare_auto = False  # the user has chosen: the view no longer switches by itself
        self._redraw(force=True)

    def _comparing(self) -> bool:
        if self.compare:
            return True
        if not self.compare_auto:
            return False
        with_curves = (view for view in self.runs.values() if _has_validation_curve(view))
        return next(with_curves, None) is not None and next(with_curves, None) is not None

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def on_option_list_option_highlighted(self, message: OptionList.OptionHighlighted) -> None:
        if 0 <= message.option_index < len(self.sources):
            self._select(self.sources[message.option_index].name)


def _has_validation_curve(view: RunState | ExperimentState) -> bool:
    """Cheap (checked each tick): whether ``view`` has a pretrain evaluation to overlay."""
    if isinstance(view, ExperimentState):
        return any(
            view.runs[stage.run].val_by_tokens.last is not None
            for stage in view.pretrain_stages()
            if stage.run in view.runs
        )
    return view.val_by_tokens.last is not None


def run_dashboard(
    sources: list[RunSource], discover_root: Path | None, refresh_s: float, compare: bool = False
) -> None:
    DashboardApp(sources, discover_root=discover_root, refresh_s=refresh_s, compare=compare).run()
