"""``blissctl dashboard``: a Textual app that follows runs as their stages write ``events.jsonl``.

One thread worker per run tails its log (``EventTail``) and posts ``EventsRead`` messages; the app
folds them into that run's ``RunState`` on its own thread; a timer redraws the shown run when it
changed. The worker waits until its last batch was folded before posting another, so a run writing
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

from tui.events import EventTail, TailBatch
from tui.runs import RunSource, discover_runs
from tui.state import PRETRAIN_CURVES, SCORER_CURVES, RunState
from tui.widgets import (
    HelpScreen,
    LossChart,
    RunList,
    ScoreHistogramChart,
    StagesPanel,
    TasksPanel,
    ThroughputPanel,
)


class EventsRead(Message):
    """A worker read new lines of one run's log (or found it truncated, replaced or missing)."""

    def __init__(self, run: str, batch: TailBatch, folded: threading.Event):
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
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        # priority: tab would otherwise move focus between widgets instead of switching runs.
        Binding("tab", "next_run", "Next run", priority=True),
        Binding("shift+tab", "previous_run", "Previous run", show=False, priority=True),
        Binding("p", "toggle_following", "Pause"),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    def __init__(
        self,
        sources: list[RunSource],
        discover_root: Path | None = None,
        refresh_s: float = 0.25,
        discover_every_s: float = 2.0,
    ):
        """Follow ``sources``; with ``discover_root``, also pick up run directories that appear there."""
        super().__init__()
        self.discover_every_s = discover_every_s
        self.sources: list[RunSource] = []
        self.runs: dict[str, RunState] = {}
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
        yield Footer()

    def on_mount(self) -> None:
        # Held, not queried on each tick: queries search the active screen, which is the help
        # screen while it is open, and the view goes on following underneath it.
        self._run_list = self.query_one(RunList)
        self._stages_panel = self.query_one(StagesPanel)
        self._curves_row = self.query_one("#curves")
        self._views = list(self.query("#stages, #scorer-loss, #pretrain-loss, #tasks, #histogram, #throughput"))
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
        self.runs[source.name] = RunState(source.name, source.path)
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
        existed: bool | None = None
        while not worker.is_cancelled:
            batch = tail.read()
            if batch.events or batch.restarted or batch.bad_lines or batch.exists != existed:
                existed = batch.exists
                folded = threading.Event()
                self.post_message(EventsRead(source.name, batch, folded))
                # Wait for the fold before reading on: bounds memory to one batch per run.
                while not folded.wait(0.1):
                    if worker.is_cancelled:
                        return
            if not batch.more:
                time.sleep(self.refresh_s)

    def on_events_read(self, message: EventsRead) -> None:
        try:
            run = self.runs.get(message.run)
            if run is None:
                return
            batch = message.batch
            if batch.restarted:
                run.restart()
            run.exists = batch.exists or run.exists
            run.bad_lines += batch.bad_lines
            run.fold_all(batch.events)
            self._changed.add(message.run)
        finally:
            message.folded.set()

    # --- drawing -----------------------------------------------------------------------------------

    def _redraw(self, force: bool = False) -> None:
        if not self.following and not force:
            return
        run = self.runs.get(self.selected) if self.selected else None
        if run is not None:
            self._stages_panel.show_freshness(run)
        if not self._changed and not force:
            return
        names = [source.name for source in self.sources]
        selected_index = names.index(self.selected) if self.selected in names else None
        self._run_list.show_runs([self.runs[name] for name in names], selected_index)
        if run is None:
            where = f"under {self.discover_root}/" if self.discover_root is not None else "to follow"
            self._stages_panel.update(Text(f"no runs {where} yet: waiting for one to start", style="dim"))
        elif force or run.name in self._changed:
            for widget in self._views:
                widget.show_run(run)  # type: ignore[attr-defined]
            # A run that only selects has no loss yet: give its histogram the room until one arrives.
            self._curves_row.display = any(len(curve) for curve in run.curves.values()) or bool(run.tasks)
        self._changed.clear()
        self._update_subtitle()

    def _update_subtitle(self) -> None:
        shown = self.selected or "no runs yet"
        state = "following" if self.following else "PAUSED (p to follow)"
        self.sub_title = f"{shown} · {state}"

    def _select(self, name: str) -> None:
        if name == self.selected:
            return
        self.selected = name
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

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def on_option_list_option_highlighted(self, message: OptionList.OptionHighlighted) -> None:
        if 0 <= message.option_index < len(self.sources):
            self._select(self.sources[message.option_index].name)


def run_dashboard(sources: list[RunSource], discover_root: Path | None, refresh_s: float) -> None:
    DashboardApp(sources, discover_root=discover_root, refresh_s=refresh_s).run()
