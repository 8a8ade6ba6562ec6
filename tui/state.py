"""The dashboard's state: a pure fold of events, testable without Textual.

``RunState.fold(event)`` is the only way state changes; widgets and ``--once`` only read it. Memory
is bounded whatever the file holds: loss curves keep at most ``CURVE_POINTS`` points (thinned evenly
as a run grows, so the whole run stays visible), throughput keeps a sliding window for its sparkline,
and only the latest histogram of each stage is kept.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from tui.events import Event, TailBatch, as_number

CURVE_POINTS = 1024
SPARKLINE_POINTS = 120
RATE_WINDOW = 16
"""Progress events used for a stage's rate and ETA: smooths jitter, still follows a change of pace."""
MAX_STAGES = 32
"""A file full of distinct stage names must not grow the stage table without end."""
MAX_FIGURES_PER_STAGE = 48
MAX_ERRORS = 20
MAX_BRANCHES = 4
"""Evaluation branches (``"branch": "decay"``, ...) kept per run; more names are ignored, not grown."""

FINISHED = ("done", "error", "interrupted", "stopped")
"""``stopped``: pretraining paused before its last step (``--resume`` continues it)."""


class Curve:
    """Points (x, y) of one line chart series, at most ``capacity`` of them.

    When full, every other point is dropped and from then on only every other new point is kept: the
    curve keeps its whole history at halving resolution, and its latest point is always shown.
    """

    def __init__(self, capacity: int = CURVE_POINTS):
        self.capacity = capacity
        self._xs: list[float] = []
        self._ys: list[float] = []
        self._stride = 1
        self._appended = 0
        self.last: tuple[float, float] | None = None

    def append(self, x: float, y: float) -> None:
        self.last = (x, y)
        if self._appended % self._stride == 0:
            self._xs.append(x)
            self._ys.append(y)
            if len(self._xs) >= self.capacity:
                self._xs = self._xs[::2]
                self._ys = self._ys[::2]
                self._stride *= 2
        self._appended += 1

    def replace_last(self, y: float) -> None:
        """The latest point measured again (a resumed run evaluating its step anew): keep the new value."""
        if self.last is None:
            return
        if self._xs and self._xs[-1] == self.last[0]:
            self._ys[-1] = y
        self.last = (self.last[0], y)

    def points(self) -> tuple[list[float], list[float]]:
        xs, ys = list(self._xs), list(self._ys)
        if self.last is not None and (not xs or (xs[-1], ys[-1]) != self.last):
            xs.append(self.last[0])
            ys.append(self.last[1])
        return xs, ys

    def __len__(self) -> int:
        return len(self._xs)


@dataclass(frozen=True, slots=True)
class Histogram:
    """A score distribution: ``edges`` has one more entry than ``counts``."""

    stage: str
    edges: tuple[float, ...]
    counts: tuple[float, ...]
    threshold: float | None

    @property
    def total(self) -> float:
        return sum(self.counts)

    def bins(self) -> list[tuple[float, float, float]]:
        """``(low, high, count)`` of each bin."""
        return [
            (low, high, count) for (low, high), count in zip(pairwise(self.edges), self.counts, strict=True)
        ]

    def fraction_above(self, threshold: float) -> float:
        """Share of the mass at or above ``threshold`` (bins split linearly): what selection keeps."""
        if self.total <= 0:
            return 0.0
        kept = 0.0
        for low, high, count in self.bins():
            if low >= threshold:
                kept += count
            elif high > threshold and high > low:
                kept += count * (high - threshold) / (high - low)
        return kept / self.total


@dataclass(slots=True)
class StageState:
    """One stage of a run (``select``, ``train-scorer``, ...), or any stage name the file brings."""

    name: str
    status: str = "running"
    phase: str = ""
    first_ts: float | None = None
    last_ts: float | None = None
    last_kind: str = ""
    fraction: float | None = None
    reports_fraction: bool = False
    """The stage sends ``fraction`` itself (train-scorer's covers warm-up and steps): trust only that."""
    step: float | None = None
    total_steps: float | None = None
    rate: float | None = None
    rate_unit: str = ""
    elapsed_s: float | None = None
    eta_s: float | None = None
    message: str | None = None
    events: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    """Latest value of every scalar field seen in this stage (the generic view of unknown kinds)."""
    _progress: deque = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))
    _steps: deque = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


LOSS_CURVES = {
    # (stage, kind, field) -> curve label; x is the event's `step`.
    ("train-scorer", "step", "loss_upper"): "scorer upper (val)",
    ("train-scorer", "step", "loss_lower"): "scorer lower",
    ("train-scorer", "warmup", "loss"): "scorer warm-up",
    ("pretrain", "step", "loss"): "pretrain loss",
    ("pretrain", "eval", "loss_val"): "pretrain val loss",
}
# Branch evaluations (a decayed copy of the model, ``"branch": "decay"``) are not the main line: they
# never enter these curves, but ``RunState.branch_evals``.
SCORER_CURVES = ("scorer upper (val)", "scorer lower", "scorer warm-up")
PRETRAIN_CURVES = ("pretrain loss", "pretrain val loss")

THROUGHPUT = {"docs_per_s": "docs/s", "tokens_per_s": "tokens/s", "mb_per_s": "MB/s"}


@dataclass(slots=True)
class Throughput:
    """One throughput figure: its latest value, the stage that reported it, and a sparkline window."""

    label: str
    stage: str = ""
    current: float | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=SPARKLINE_POINTS))


MAX_TASKS = 32


@dataclass(frozen=True)
class TaskAccuracy:
    """One downstream task's zero-shot accuracy (fractions in [0, 1]; acc_norm None where none)."""

    acc: float | None
    acc_norm: float | None
    n: float | None

    @property
    def score(self) -> float | None:
        """What the paper's table lists: acc_norm where there is one, else acc."""
        return self.acc_norm if self.acc_norm is not None else self.acc


class RunState:
    """Everything the dashboard shows about one run, folded from its events."""

    def __init__(self, name: str, path: Path | str | None = None):
        self.name = name
        self.path = Path(path) if path is not None else None
        self.exists = False
        self.restarts = 0
        self._clear()

    def _clear(self) -> None:
        self.stages: dict[str, StageState] = {}
        self.curves: dict[str, Curve] = {label: Curve() for label in LOSS_CURVES.values()}
        self.histograms: dict[str, Histogram] = {}
        self.throughput: dict[str, Throughput] = {key: Throughput(label) for key, label in THROUGHPUT.items()}
        self.evaluation: dict[str, float] = {}
        self.tasks: dict[str, TaskAccuracy] = {}
        """Zero-shot accuracy per downstream task, from the latest ``tasks`` event of ``blissctl eval``."""
        self.tasks_average: float | None = None
        self.errors: deque[tuple[str, str]] = deque(maxlen=MAX_ERRORS)
        self.events = 0
        self.bad_lines = 0
        self.ignored = 0
        """Events of a kind not understood (their figures still show generically) or past ``MAX_STAGES``."""
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.val_by_tokens = Curve()
        """Pretraining's main-line validation loss against tokens trained (what runs are compared by)."""
        self.branch_evals: dict[str, Curve] = {}
        """Validation loss of each evaluation branch (``decay``, ...) against tokens: marked points."""
        self._batch_tokens: float | None = None
        self._step_tokens: tuple[float, float] | None = None
        """(step, tokens_seen) of the latest pretrain ``step`` event: where an eval without its own
        ``tokens_seen`` sits, when it evaluates that very step."""

    # --- folding -------------------------------------------------------------------------------

    def fold_all(self, events: list[Event]) -> None:
        for event in events:
            self.fold(event)

    def fold_batch(self, batch: TailBatch) -> None:
        """One ``EventTail.read``: a truncated or replaced file first forgets what it said before."""
        if batch.restarted:
            self.restart()
        self.exists = batch.exists or self.exists
        self.bad_lines += batch.bad_lines
        self.fold_all(batch.events)

    def restart(self) -> None:
        """The file was truncated or replaced: start again from its first line."""
        self._clear()
        self.restarts += 1

    def fold(self, event: Event) -> None:
        self.events += 1
        ts = event.ts
        if ts is not None:
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        stage = self._stage(event.stage)
        if stage is None:
            self.ignored += 1
            return
        stage.events += 1
        stage.last_kind = event.kind
        if ts is not None:
            stage.first_ts = ts if stage.first_ts is None else stage.first_ts
            stage.last_ts = ts
        branch = _branch(event)
        if branch is None:
            self._remember_figures(stage, event)
        else:
            # A branch's loss is not the model's: it must not pass for the stage's latest loss_val.
            self._remember_branch_figure(stage, branch, event)

        kind = event.kind
        if kind == "start":
            # Also a resume: the pace before the pause says nothing about the pace now.
            stage.status = "running"
            stage.phase = ""
            stage.message = None
            stage._progress.clear()
            stage._steps.clear()
        elif kind in ("progress", "step", "warmup"):
            if stage.finished:
                stage.status = "running"  # a resumed or restarted stage
            if kind != "progress":
                stage.phase = "warm-up" if kind == "warmup" else ""
            self._fold_progress(stage, event)
        elif kind == "histogram":
            self._fold_histogram(event)
        elif kind == "done":
            stage.status = "done"
            stage.fraction = 1.0
            stage.eta_s = 0.0
            stage.elapsed_s = event.number("elapsed_s") or stage.elapsed_s
            threshold = event.number("threshold")
            histogram = self.histograms.get(event.stage)
            if threshold is not None and histogram is not None and histogram.threshold is None:
                self.histograms[event.stage] = Histogram(
                    histogram.stage, histogram.edges, histogram.counts, threshold
                )
        elif kind == "error" and event.data.get("interrupted") is True:  # Ctrl-C: resumable, not a failure
            stage.status = "interrupted"
            message = event.data.get("message")
            stage.message = str(message) if message is not None else None
        elif kind == "error":
            stage.status = "error"
            message = event.data.get("message")
            stage.message = str(message) if message is not None else "error"
            self.errors.append((stage.name, stage.message))
        elif kind in ("interrupted", "stopped"):
            stage.status = kind
        elif kind == "eval" and branch is not None:
            self._fold_branch_eval(branch, event)
        elif kind == "eval":
            self._fold_eval(stage, event)
        elif kind == "tasks":
            self._fold_tasks(stage, event)
        else:
            self.ignored += 1  # shown generically through the stage's figures; nothing else to do

        if event.stage == "pretrain":
            self._remember_tokens(event, branch)
        for (curve_stage, curve_kind, name), label in LOSS_CURVES.items():
            if event.stage == curve_stage and kind == curve_kind and branch is None:
                x, y = event.number("step"), event.number(name)
                if x is not None and y is not None:
                    self.curves[label].append(x, y)

        for key, throughput in self.throughput.items():
            value = event.number(key)
            if value is None:
                continue
            if throughput.stage != event.stage:
                # Another stage took over (select, then pretrain): its sparkline starts afresh.
                throughput.stage = event.stage
                throughput.recent.clear()
            throughput.current = value
            throughput.recent.append(value)

    def _stage(self, name: str) -> StageState | None:
        stage = self.stages.get(name)
        if stage is None and len(self.stages) < MAX_STAGES:
            stage = self.stages[name] = StageState(name)
        return stage

    @staticmethod
    def _remember_figures(stage: StageState, event: Event) -> None:
        for key, value in event.data.items():
            if key in ("ts", "stage", "kind") or not isinstance(value, (int, float, str, bool)):
                continue
            if key in stage.figures or len(stage.figures) < MAX_FIGURES_PER_STAGE:
                stage.figures[key] = value if not isinstance(value, str) else value[:200]

    def _fold_progress(self, stage: StageState, event: Event) -> None:
        fraction = event.number("fraction")
        step, total = event.number("step"), event.number("total_steps")
        if step is not None:
            stage.step = step
        if total is not None:
            stage.total_steps = total
        if fraction is not None:
            stage.reports_fraction = True
        elif not stage.reports_fraction and step is not None and total:
            fraction = step / total
        if fraction is not None:
            fraction = min(max(fraction, 0.0), 1.0)
            if stage.fraction is not None and fraction < stage.fraction:
                # Progress went backwards (warm-up ended, or a restart): old pace says nothing now.
                stage._progress.clear()
                stage._steps.clear()
            stage.fraction = fraction
        ts = event.ts
        if ts is not None and fraction is not None:
            stage._progress.append((ts, fraction))
        if ts is not None and step is not None:
            stage._steps.append((ts, step))

        elapsed = event.number("elapsed_s")
        if elapsed is None and stage.first_ts is not None and ts is not None:
            elapsed = ts - stage.first_ts
        stage.elapsed_s = elapsed

        stage.rate, stage.rate_unit = _stage_rate(stage, event)
        stage.eta_s = _eta(stage)

    def _fold_histogram(self, event: Event) -> None:
        edges, counts = event.data.get("edges"), event.data.get("counts")
        if not isinstance(edges, list) or not isinstance(counts, list) or not counts:
            self.ignored += 1
            return
        if len(edges) != len(counts) + 1:
            self.ignored += 1
            return
        edge_numbers = [as_number(edge) for edge in edges]
        count_numbers = [as_number(count) for count in counts]
        if None in edge_numbers or None in count_numbers:
            self.ignored += 1
            return
        threshold = event.number("threshold")
        previous = self.histograms.get(event.stage)
        if threshold is None and previous is not None and previous.edges == tuple(edge_numbers):
            # A refreshed histogram without a threshold must not hide one already known.
            threshold = previous.threshold
        self.histograms[event.stage] = Histogram(
            event.stage,
            tuple(edge_numbers),
            tuple(count_numbers),
            threshold,  # type: ignore[arg-type]
        )

    def _remember_tokens(self, event: Event, branch: str | None) -> None:
        if event.kind == "start":
            self._batch_tokens = event.number("global_batch_tokens") or self._batch_tokens
        elif event.kind == "step":
            step, tokens = event.number("step"), event.number("tokens_seen")
            if step is not None and tokens is not None:
                self._step_tokens = (step, tokens)
        elif event.kind == "eval" and branch is None:
            tokens, loss = self.eval_tokens(event), event.number("loss_val")
            if tokens is not None and loss is not None:
                _append_forward(self.val_by_tokens, tokens, loss)

    def eval_tokens(self, event: Event) -> float | None:
        """Tokens trained when a pretrain ``eval`` was taken: its own ``tokens_seen`` (which counts earlier
        rounds of a continued model), else the tokens of a ``step`` event at the same step, else (older
        runs) ``step × global_batch_tokens`` of the ``start`` event; ``None`` when none is known."""
        tokens = event.number("tokens_seen")
        if tokens is not None:
            return tokens
        step = event.number("step")
        if step is None:
            return None
        if self._step_tokens is not None and self._step_tokens[0] == step:
            return self._step_tokens[1]
        return step * self._batch_tokens if self._batch_tokens else None

    def _fold_branch_eval(self, branch: str, event: Event) -> None:
        curve = self.branch_evals.get(branch)
        if curve is None:
            if len(self.branch_evals) >= MAX_BRANCHES:
                self.ignored += 1
                return
            curve = self.branch_evals[branch] = Curve()
        tokens, loss = self.eval_tokens(event), event.number("loss_val")
        if tokens is not None and loss is not None:
            _append_forward(curve, tokens, loss)

    @staticmethod
    def _remember_branch_figure(stage: StageState, branch: str, event: Event) -> None:
        key, value = f"{branch[:40]}_loss_val", event.number("loss_val")
        if value is not None and (key in stage.figures or len(stage.figures) < MAX_FIGURES_PER_STAGE):
            stage.figures[key] = value

    def _fold_eval(self, stage: StageState, event: Event) -> None:
        if stage.name == "eval":
            # The eval stage's whole output is this one result.
            stage.status = "done"
            stage.fraction = 1.0
            for key in ("loss_val", "perplexity", "bits_per_byte"):
                value = event.number(key)
                if value is not None:
                    self.evaluation[key] = value

    def _fold_tasks(self, stage: StageState, event: Event) -> None:
        names = event.data.get("tasks")
        if not isinstance(names, list):
            return
        stage.status, stage.fraction = "done", 1.0
        self.tasks = {}
        for name in names[:MAX_TASKS]:
            if isinstance(name, str):
                self.tasks[name] = TaskAccuracy(acc=event.number(f"{name}_acc"),
                                                acc_norm=event.number(f"{name}_acc_norm"),
                                                n=event.number(f"{name}_n"))
        self.tasks_average = event.number("average_score")

    # --- reading -------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """``waiting`` before any event; else the status of the latest stage to report."""
        if not self.stages:
            return "waiting"
        latest = max(self.stages.values(), key=lambda stage: stage.last_ts or 0.0)
        if any(stage.status == "error" for stage in self.stages.values()):
            return "error"
        return latest.status

    def histogram(self) -> Histogram | None:
        """The histogram to show: selection's when there is one (it knows the threshold)."""
        if "select" in self.histograms:
            return self.histograms["select"]
        if not self.histograms:
            return None
        return next(reversed(self.histograms.values()))

    def threshold(self) -> float | None:
        histogram = self.histogram()
        if histogram is not None and histogram.threshold is not None:
            return histogram.threshold
        select = self.stages.get("select")
        return as_number(select.figures.get("threshold")) if select is not None else None


def _branch(event: Event) -> str | None:
    """The evaluation branch an event belongs to (``decay``), or ``None`` for the main line."""
    branch = event.data.get("branch")
    return branch if isinstance(branch, str) and branch else None


def _append_forward(curve: Curve, x: float, y: float) -> None:
    """Append, keeping x increasing: a resumed run that evaluates a step again replaces that point's
    value (as ``engine.eval.compare.pretrain_curve`` does) rather than drawing a line back in time."""
    if curve.last is not None and x <= curve.last[0]:
        if x == curve.last[0]:
            curve.replace_last(y)
        return
    curve.append(x, y)


def _stage_rate(stage: StageState, event: Event) -> tuple[float | None, str]:
    """The stage's pace in its own unit: what the stage reports, else measured across recent events."""
    for key, unit in (("docs_per_s", "docs/s"), ("steps_per_s", "steps/s")):
        value = event.number(key)
        if value is not None:
            return value, unit
    if len(stage._steps) >= 2:
        (t0, s0), (t1, s1) = stage._steps[0], stage._steps[-1]
        if t1 > t0:
            return (s1 - s0) / (t1 - t0), "steps/s"
    if len(stage._progress) >= 2:
        (t0, f0), (t1, f1) = stage._progress[0], stage._progress[-1]
        if t1 > t0:
            return 100 * (f1 - f0) / (t1 - t0), "%/s"
    return stage.rate, stage.rate_unit


def _eta(stage: StageState) -> float | None:
    if stage.fraction is None:
        return None
    if stage.fraction >= 1.0:
        return 0.0
    if len(stage._progress) < 2:
        return None
    (t0, f0), (t1, f1) = stage._progress[0], stage._progress[-1]
    if t1 <= t0 or f1 <= f0:
        return None
    return (1.0 - f1) * (t1 - t0) / (f1 - f0)
