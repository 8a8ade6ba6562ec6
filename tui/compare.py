"""The overlay of several runs' validation-loss curves against tokens (BLISS against a random arm).

Pure: it reads ``RunState`` s and ``ExperimentState`` s and returns ``Series``; the chart widget and
``--once`` draw them. Tokens, not steps, are the shared axis: two arms with different batch sizes, or
an experiment whose rounds each restart their step count, still line up.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from tui.experiment import ExperimentState
from tui.state import RunState

MAX_SERIES = 8
"""Series drawn at once: one colour each, and a legend that still fits beside the chart."""
SERIES_COLORS = ("cyan", "orange", "green", "magenta", "blue+", "red", "gray+", "orange+")


@dataclass(frozen=True)
class Series:
    """One source's main-line validation loss against tokens, and its evaluation-branch points."""

    label: str
    xs: list[float]
    ys: list[float]
    branches: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    round_starts: list[float] = field(default_factory=list)
    """Where each round's line begins (experiments): the chart marks them."""

    @property
    def last(self) -> tuple[float, float]:
        return self.xs[-1], self.ys[-1]

    def loss_at(self, tokens: float) -> float | None:
        """The loss at ``tokens``, linearly between the two evaluations around it; ``None`` outside."""
        if not self.xs or tokens < self.xs[0] or tokens > self.xs[-1]:
            return None
        index = bisect_left(self.xs, tokens)
        if self.xs[index] == tokens:
            return self.ys[index]
        x0, x1, y0, y1 = self.xs[index - 1], self.xs[index], self.ys[index - 1], self.ys[index]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)


def series_of(view: RunState | ExperimentState) -> Series | None:
    """``view`` 's validation loss against tokens; ``None`` before its first evaluation."""
    if isinstance(view, ExperimentState):
        xs, ys, starts = view.main_line()
        branches = view.branch_points()
    else:
        xs, ys = view.val_by_tokens.points()
        branches, starts = {name: curve.points() for name, curve in view.branch_evals.items()}, []
    if not xs:
        return None
    branches = {name: points for name, points in branches.items() if points[0]}
    return Series(view.name, xs, ys, branches, starts)


def overlay_series(views: list[RunState | ExperimentState]) -> tuple[list[Series], int]:
    """The series to overlay, in the order given, at most ``MAX_SERIES``; and how many more had one."""
    found = [series for view in views if (series := series_of(view)) is not None]
    return found[:MAX_SERIES], max(0, len(found) - MAX_SERIES)


def common_tokens(series: list[Series]) -> float | None:
    """The most tokens every series has reached: where they are compared at equal tokens."""
    if len(series) < 2:
        return None
    tokens = min(one.xs[-1] for one in series)
    return tokens if all(one.xs[0] <= tokens for one in series) else None
