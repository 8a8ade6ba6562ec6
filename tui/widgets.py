"""The dashboard's widgets: each one renders part of a ``RunState`` (or an ``ExperimentState``, or the
overlay of several) and holds no state of its own."""

from __future__ import annotations

import math

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Sparkline, Static
from textual_plotext import PlotextPlot

from tui.compare import SERIES_COLORS, Series
from tui.experiment import ExperimentState
from tui.render import (
    STATUS_GLYPH,
    STATUS_STYLE,
    comparison_table,
    experiment_notes,
    histogram_caption,
    human_number,
    round_results_table,
    rounds_table,
    run_footer,
    stages_table,
    tasks_table,
)
from tui.state import THROUGHPUT, RunState

CURVE_COLORS = {
    "scorer upper (val)": "orange",
    "scorer lower": "cyan",
    "scorer warm-up": "gray",
    "pretrain loss": "cyan",
    "pretrain val loss": "orange",
}


def run_prompt(run: RunState | ExperimentState) -> Text:
    status = run.status
    caption = status
    if isinstance(run, ExperimentState):
        rounds = len(run.round_numbers)
        caption = f"{status} · {rounds} round{'s' if rounds != 1 else ''}" if run.plan else f"{status} · experiment"
    return Text.assemble(
        (f"{STATUS_GLYPH.get(status, '?')} ", STATUS_STYLE.get(status, "")),
        (run.name, "bold"),
        (f"\n  {caption}", "dim"),
    )


class RunList(OptionList):
    """The runs being followed; choosing one shows it."""

    def show_runs(self, runs: list[RunState | ExperimentState], selected: int | None) -> None:
        prompts = [run_prompt(run) for run in runs]
        if self.option_count != len(prompts):
            # Runs were added (perhaps above the shown one): keep the highlight on the shown run.
            self.set_options(prompts)
            self.highlighted = selected
            return
        for index, prompt in enumerate(prompts):
            if self.get_option_at_index(index).prompt != prompt:
                self.replace_option_prompt_at_index(index, prompt)


class StagesPanel(Static):
    """Each stage with its progress bar, rate, ETA and latest figures."""

    def show_run(self, run: RunState) -> None:
        # A narrow terminal drops the figures column first: progress, rate and ETA matter more.
        width = self.size.width
        bar_width = 24 if width >= 140 else 10 if width >= 80 else 6
        self.update(stages_table(run, bar_width=bar_width, wide=width >= 110))
        self.show_freshness(run)

    def show_freshness(self, run: RunState | ExperimentState) -> None:
        """How long ago the last event came: redrawn every tick, so a stalled run looks stalled."""
        self.border_subtitle = run_footer(run).plain


class RoundsPanel(Static):
    """An experiment's rounds: one row each, a column per role, each cell its stage's status."""

    def show_experiment(self, experiment: ExperimentState) -> None:
        parts: list = [rounds_table(experiment, wide=self.size.width >= 100)]
        results = round_results_table(experiment)
        if results is not None:  # the finished experiment's own figures: threshold, drift, composition
            parts += [Text("per-round results", style="bold"), results]
        parts += experiment_notes(experiment)
        self.update(Group(*parts))
        self.border_title = _experiment_title(experiment)
        self.show_freshness(experiment)

    def show_freshness(self, experiment: RunState | ExperimentState) -> None:
        self.border_subtitle = run_footer(experiment).plain


def _experiment_title(experiment: ExperimentState) -> str:
    plan = experiment.plan
    if plan is None:
        return f"experiment {experiment.name}"
    kind = f"{plan.kind} " if plan.kind else ""
    return f"{kind}experiment {plan.name or experiment.name}"


class ActiveStagePanel(Static):
    """The experiment's stage that reported last, in full: progress bar, rate, ETA, figures."""

    def show_experiment(self, experiment: ExperimentState) -> None:
        active = [(run.last_ts or 0.0, stage) for stage in experiment.stages
                  if (run := experiment.runs.get(stage.run)) is not None and run.stages]
        self.display = bool(active)
        if not active:
            return
        _, stage = max(active, key=lambda item: item[0])
        run = experiment.runs[stage.run]
        self.border_title = f"{stage.run} · {stage.title or stage.role}"
        width = self.size.width
        self.update(stages_table(run, bar_width=24 if width >= 140 else 10, wide=width >= 110))


class TasksPanel(Static):
    """Zero-shot accuracy per downstream task (``blissctl eval --tasks``), beside the loss curves."""

    def show_run(self, run: RunState) -> None:
        self.display = bool(run.tasks)
        if run.tasks:
            self.update(tasks_table(run))


class LossChart(PlotextPlot):
    """A line chart of some of a run's loss curves against step."""

    def __init__(self, title: str, curves: tuple[str, ...], waiting_for: str, **kwargs):
        super().__init__(**kwargs)
        self.title = title
        self.curves = curves
        self.waiting_for = waiting_for
        self.shown_points = 0
        """Points drawn at the last update (what the pilot tests check)."""

    def show_run(self, run: RunState) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.title)
        plt.xlabel("step")
        self.shown_points = 0
        low, high = float("inf"), float("-inf")
        # Drawn last on top: the first curve (the main one) must not hide under the others.
        for label in reversed(self.curves):
            xs, ys = run.curves[label].points()
            if not xs:
                continue
            plt.plot(xs, ys, label=label, color=CURVE_COLORS.get(label), marker="braille")
            self.shown_points += len(xs)
            low, high = min(low, min(xs)), max(high, max(xs))
        if not self.shown_points:
            plt.title(f"{self.title}: waiting for {self.waiting_for}")
        else:
            ticks = nice_ticks(low, high)
            plt.xticks(ticks, [human_number(tick) for tick in ticks])
            # A little room on the right: plotext draws the last braille dots past the frame otherwise.
            plt.xlim(low, high + max(1.0, 0.02 * (high - low)))
        self.refresh()


class TokensLossChart(PlotextPlot):
    """Validation loss against tokens trained: one series (an experiment's rounds joined into one line,
    round starts marked) or several overlaid, each its own colour, with a legend. Evaluation-branch
    points (the decayed model) are marked ◆ in their series' colour."""

    def __init__(self, title: str, **kwargs):
        super().__init__(**kwargs)
        self.title = title
        self.shown_series: list[tuple[str, int, str]] = []
        """(label, main-line points, colour) of each series drawn (what the pilot tests check)."""
        self.shown_branch_points = 0

    def show_series(self, series: list[Series], waiting: str, hidden: int = 0, rounds: bool = False) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel("tokens")
        self.shown_series, self.shown_branch_points = [], 0
        if not series:
            plt.title(f"{self.title}: {waiting}")
            self.refresh()
            return
        low = min(one.xs[0] for one in series)
        high = max(one.xs[-1] for one in series)
        for branch_xs, _ in (points for one in series for points in one.branches.values()):
            low, high = min(low, min(branch_xs)), max(high, max(branch_xs))
        if rounds:
            for start in series[0].round_starts[1:]:
                plt.vline(start, color="gray")
        # In the order named, so the legend reads as the command line did.
        for index, one in enumerate(series):
            color = SERIES_COLORS[index % len(SERIES_COLORS)]
            label = "main line" if rounds else one.label
            plt.plot(one.xs, one.ys, label=label, color=color, marker="braille")
            for branch, (xs, ys) in one.branches.items():
                branch_color = "orange" if rounds else color
                plt.scatter(xs, ys, marker="◆", color=branch_color,
                            label=f"{branch} branch" if rounds or len(series) == 1 else None)
                self.shown_branch_points += len(xs)
            self.shown_series.append((one.label, len(one.xs), color))
        more = f" (+{hidden} more not shown)" if hidden else ""
        plt.title(f"{self.title}{more}")
        ticks = nice_ticks(low, high)
        plt.xticks(ticks, [human_number(tick) for tick in ticks])
        plt.xlim(low, high + max(1.0, 0.02 * (high - low)))
        self.refresh()


class CompareTable(Static):
    """Beside the overlay: each run's last validation loss, and all of them at equal tokens."""

    def show_series(self, series: list[Series]) -> None:
        self.display = bool(series)
        if series:
            self.update(comparison_table(series))


def nice_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten apart) covering ``low..high``."""
    span = high - low
    if span <= 0:
        return [low]
    raw = span / most
    power = 10 ** math.floor(math.log10(raw))
    spacing = next(factor * power for factor in (1, 2, 5, 10) if factor * power >= raw)
    first = math.ceil(low / spacing) * spacing
    return [first + index * spacing for index in range(int((high - first) // spacing) + 1)]


class ScoreHistogramChart(PlotextPlot):
    """The score distribution as bars, with the selection threshold as a vertical red line."""

    shown_threshold: float | None = None
    shown_bins = 0

    def show_run(self, run: RunState) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        histogram = run.histogram()
        self.shown_bins = 0
        self.shown_threshold = None
        if histogram is None:
            plt.title("score distribution: waiting for a histogram")
            self.refresh()
            return
        bins = histogram.bins()
        width = 0.9 * min(high - low for low, high, _ in bins)
        threshold = histogram.threshold if histogram.threshold is not None else run.threshold()
        # Bins the selection keeps are green, the rest blue: the threshold's effect at a glance.
        for kept, color in ((False, "blue"), (True, "green")):
            chosen = [(low, high, count) for low, high, count in bins if _is_kept(low, threshold) == kept]
            if chosen:
                centers = [(low + high) / 2 for low, high, _ in chosen]
                plt.bar(centers, [count for _, _, count in chosen], width=width, color=color, marker="hd")
        self.shown_bins = len(bins)
        ticks = histogram.edges[:: max(1, len(bins) // 8)]
        plt.xticks(list(ticks), [f"{tick:.2g}" for tick in ticks])
        if threshold is not None:
            plt.vline(threshold, color="red")
            self.shown_threshold = threshold
        plt.title(f"score distribution ({histogram.stage}) · {histogram_caption(histogram)}")
        plt.xlabel("score")
        self.refresh()


def _is_kept(low_edge: float, threshold: float | None) -> bool:
    return threshold is not None and low_edge >= threshold


class ThroughputPanel(Vertical):
    """docs/s, tokens/s and MB/s: the current value and a sparkline of the recent window each."""

    def compose(self) -> ComposeResult:
        for key in THROUGHPUT:
            yield Label(id=f"{key}-value", classes="throughput-value")
            yield Sparkline([], id=f"{key}-sparkline", classes="throughput-sparkline")

    def show_run(self, run: RunState) -> None:
        for key, throughput in run.throughput.items():
            value = Text.assemble(
                (f"{throughput.label:<9}", "bold"),
                (human_number(throughput.current), "bold cyan" if throughput.current else "dim"),
                (f"  ({throughput.stage})" if throughput.stage else "", "dim"),
            )
            self.query_one(f"#{key}-value", Label).update(value)
            self.query_one(f"#{key}-sparkline", Sparkline).data = list(throughput.recent)


HELP_TEXT = """\
[b]blissctl dashboard[/b]: follows each run's events.jsonl; new lines show within a second.

  [b]tab[/b] / [b]shift+tab[/b]   next / previous run (or click one in the list)
  [b]c[/b]                 compare: overlay every followed run's validation loss against tokens
  [b]p[/b]                 pause following: the screen holds still, events are still read
  [b]?[/b]                 this help
  [b]q[/b]                 quit

Stages show progress (fraction, or step/total_steps), rate and ETA from recent events.
Loss charts keep the whole run, thinned evenly once long; sparklines show the recent window.
The red line on the score distribution is the selection threshold, once select knows it.

[b]Experiments[/b] (a folder with experiment.json, from [b]blissctl rounds[/b]) are one entry: a row
per round, a column per role (select, proxy / scorer, pretrain), each cell its stage's status; below,
the validation loss against tokens joined across rounds (grey lines: round starts), and [b]◆[/b] the
decayed evaluation branch of each round. A stage run alone: name its path (RUNS/EXP/r1-lm).

[b]Compare[/b] ([b]c[/b]; by itself when runs named together both have curves) overlays the
validation loss of each run or experiment in its own colour, against tokens trained, with the loss
of each at the most tokens all have reached. Choosing a run in the list leaves it.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close"),
        Binding("q", "dismiss", "Close"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90; height: auto; max-height: 80%;
        border: round $primary; background: $surface; padding: 1 2;
    }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP_TEXT)
