"""Rich renderables made from a ``RunState`` or an ``ExperimentState``: shared by the Textual widgets
and ``--once``."""

from __future__ import annotations

import time

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tui.compare import Series, common_tokens
from tui.experiment import ExperimentState, StageCell
from tui.state import PRETRAIN_CURVES, SCORER_CURVES, Histogram, RunState, StageState

STATUS_STYLE = {
    "running": "bold cyan",
    "done": "bold green",
    "error": "bold red",
    "interrupted": "bold yellow",
    "stopped": "bold yellow",
    "waiting": "dim",
}
STATUS_GLYPH = {"running": "●", "done": "✔", "error": "✖", "interrupted": "‖", "stopped": "‖", "waiting": "…"}

STAGE_FIGURES = {
    # The figures worth a glance for each known stage, in order; unknown stages show what they have.
    "select": ("docs_seen", "docs_kept", "tokens_kept", "skipped", "threshold", "scorer", "budget"),
    "train-scorer": ("loss_lower", "loss_upper", "hypergrad_norm", "weight_entropy", "loss"),
    "pretrain": ("loss", "loss_val", "decay_loss_val", "lr", "mfu", "tokens_seen"),
    "eval": ("loss_val", "perplexity", "bits_per_byte"),
}
PROGRESS_FIELDS = {"fraction", "step", "total_steps", "elapsed_s", "shards_done", "shards_total"}


def human_number(value: float | None) -> str:
    """``5300 -> 5.3k``, ``1.4e6 -> 1.4M``, ``2.504 -> 2.5``: short enough for a table cell."""
    if value is None:
        return "—"
    magnitude = abs(value)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= scale:
            scaled = value / scale
            return f"{scaled:.1f}{suffix}" if abs(scaled) < 100 else f"{scaled:.0f}{suffix}"
    if magnitude >= 100 or value == int(value):
        return f"{value:.0f}"
    if magnitude >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def human_figure(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return human_number(float(value))
    return str(value)


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def status_text(status: str) -> Text:
    return Text(f"{STATUS_GLYPH.get(status, '?')} {status}", style=STATUS_STYLE.get(status, ""))


def stage_figures(stage: StageState, limit: int = 4) -> str:
    names = STAGE_FIGURES.get(stage.name)
    if names is None:
        names = tuple(name for name in stage.figures if name not in PROGRESS_FIELDS)
    shown = [f"{name} {human_figure(stage.figures[name])}" for name in names if name in stage.figures]
    return "  ".join(shown[:limit])


def stages_table(run: RunState, bar_width: int = 24, wide: bool = True) -> Table:
    """One row per stage. ``wide`` (the live view) adds steps and the stage's latest figures."""
    table = Table(
        expand=wide, box=None, padding=(0, 1), collapse_padding=True, pad_edge=False, header_style="bold"
    )
    table.add_column("stage", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("progress", no_wrap=True)
    table.add_column("rate", justify="right", no_wrap=True)
    table.add_column("ETA", justify="right", no_wrap=True)
    table.add_column("elapsed", justify="right", no_wrap=True)
    if wide:
        table.add_column("last figures", ratio=1, overflow="ellipsis", no_wrap=True)
    if not run.stages:
        where = run.path / "events.jsonl" if run.path is not None else "events.jsonl"
        waiting = f"waiting for {where}" if not run.exists else "waiting for the first event"
        table.add_row(Text(waiting, style="dim"))
        return table
    for stage in run.stages.values():
        progress: RenderableType
        if stage.fraction is None:
            progress = Text(stage.last_kind, style="dim")
        else:
            progress = Table.grid(padding=(0, 1))
            cells: list[RenderableType] = [
                ProgressBar(total=1.0, completed=stage.fraction, width=bar_width),
                Text(f"{100 * stage.fraction:5.1f}%"),
            ]
            if wide and stage.step is not None and stage.total_steps:
                cells.append(Text(step_count(stage), style="dim"))
            progress.add_row(*cells)
        rate = f"{human_number(stage.rate)} {stage.rate_unit}" if stage.rate is not None else "—"
        eta = "—" if stage.finished else human_duration(stage.eta_s)
        name = Text(stage.name, style="bold")
        if stage.phase:
            name.append(f" ({stage.phase})", style="dim")
        row: list[RenderableType] = [
            name,
            status_text(stage.status),
            progress,
            rate,
            eta,
            human_duration(stage.elapsed_s),
        ]
        if wide:
            figures = stage.message if stage.message else stage_figures(stage)
            row.append(Text(figures, style="red" if stage.message else ""))
        table.add_row(*row)
    return table


def step_count(stage: StageState) -> str:
    if stage.step is None or not stage.total_steps:
        return ""
    return f"{stage.step:.0f}/{stage.total_steps:.0f}"


def run_footer(run: RunState | ExperimentState, now: float | None = None) -> Text:
    """One line: how fresh the data is and what was skipped, so a stalled run does not look alive."""
    now = time.time() if now is None else now
    parts = [f"{run.events} events"]
    if run.last_ts is not None:
        parts.append(f"last {human_duration(now - run.last_ts)} ago")
    if run.bad_lines:
        parts.append(f"{run.bad_lines} unreadable lines skipped")
    if isinstance(run, RunState) and run.restarts:
        parts.append(f"file restarted {run.restarts}×")
    if isinstance(run, ExperimentState):
        parts.insert(0, f"{run.finished_stages}/{len(run.stages)} stages finished")
    return Text(" · ".join(parts), style="dim")


def text_histogram(histogram: Histogram, rows: int = 10, width: int = 32) -> Table:
    """The score distribution as horizontal bars, bins merged to ``rows``; kept bins green."""
    groups = max(1, -(-len(histogram.counts) // rows))
    merged: list[tuple[float, float, float]] = []
    for start in range(0, len(histogram.counts), groups):
        end = min(start + groups, len(histogram.counts))
        merged.append((histogram.edges[start], histogram.edges[end], sum(histogram.counts[start:end])))
    peak = max((count for _, _, count in merged), default=0) or 1
    threshold = histogram.threshold
    table = Table(box=None, padding=(0, 1), show_header=False)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(no_wrap=True)
    for low, high, count in merged:
        kept = threshold is not None and low >= threshold
        bar = Text("█" * max(0, round(width * count / peak)), style="green" if kept else "blue")
        marker = ""
        if threshold is not None and low <= threshold < high:
            marker = f"◀ {threshold:.3g}"
        table.add_row(f"{low:.2f}–{high:.2f}", bar, human_number(count), Text(marker, style="bold red"))
    return table


def histogram_caption(histogram: Histogram) -> str:
    caption = f"{human_number(histogram.total)} {'documents' if histogram.stage == 'select' else 'scores'}"
    if histogram.threshold is not None:
        kept = histogram.fraction_above(histogram.threshold)
        caption += f" · threshold {histogram.threshold:.3g} keeps ≈{100 * kept:.0f}%"
    else:
        caption += " · threshold not known yet"
    return caption


def tasks_table(run: RunState) -> Table:
    """Zero-shot accuracy per task, in percent, the paper's way (score = acc_norm where there is one)."""
    table = Table(box=None, padding=(0, 1), header_style="bold")
    for column in ("task", "acc", "acc_norm", "score"):
        table.add_column(column, justify="left" if column == "task" else "right")

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    for name, task in run.tasks.items():
        table.add_row(name, percent(task.acc), percent(task.acc_norm), percent(task.score))
    if run.tasks_average is not None:
        table.add_row(Text("average", style="bold"), "", "", Text(percent(run.tasks_average), style="bold"))
    return table


def run_summary(run: RunState, now: float | None = None) -> Panel:
    """Everything ``--once`` prints about one run."""
    parts: list[RenderableType] = [stages_table(run, bar_width=12, wide=False)]

    figures = Table(box=None, padding=(0, 1), show_header=False)
    figures.add_column(style="bold", no_wrap=True)
    figures.add_column()
    for stage in run.stages.values():
        steps = f"step {step_count(stage)}  " if step_count(stage) else ""
        shown = stage.message or steps + stage_figures(stage, limit=8)
        if shown:
            figures.add_row(stage.name, Text(shown, style="red" if stage.message else ""))
    for label in (*SCORER_CURVES, *PRETRAIN_CURVES):
        last = run.curves[label].last
        if last is not None:
            figures.add_row(label, f"{human_number(last[1])} at step {last[0]:.0f}")
    for throughput in run.throughput.values():
        if throughput.current is not None:
            figures.add_row(throughput.label, f"{human_number(throughput.current)} ({throughput.stage})")
    for key, value in run.evaluation.items():
        figures.add_row(f"eval {key}", human_number(value))
    if figures.row_count:
        parts += [Text(""), figures]

    if run.tasks:
        parts += [Text(""), Text("zero-shot accuracy, % (blissctl eval --tasks)", style="bold"), tasks_table(run)]

    histogram = run.histogram()
    if histogram is not None:
        title = Text(f"score distribution ({histogram.stage}) · {histogram_caption(histogram)}", style="bold")
        parts += [Text(""), title, text_histogram(histogram)]
    for stage, message in run.errors:
        parts.append(Text(f"{stage}: {message}", style="bold red"))
    parts += [Text(""), run_footer(run, now)]
    title = Text.assemble(Text(run.name, style="bold"), " ", status_text(run.status))
    return Panel(Group(*parts), title=title, title_align="left", subtitle=str(run.path or ""))


# --- experiments -------------------------------------------------------------------------------------


def stage_cell_text(cell: StageCell, wide: bool = True) -> Text:
    """``✔ done 3.1s``, ``● 42%``, ``… waiting``, ``✖ error``; ``wide`` names the stage's run below."""
    status = cell.status
    text = Text(f"{STATUS_GLYPH.get(status, '?')} ", style=STATUS_STYLE.get(status, ""))
    if status == "running" and cell.fraction is not None:
        text.append(f"{100 * cell.fraction:.0f}%", style=STATUS_STYLE["running"])
    else:
        text.append(status, style=STATUS_STYLE.get(status, ""))
    if cell.seconds is not None and status != "waiting":
        text.append(f" {human_duration(cell.seconds)}", style="dim")
    if wide:
        text.append(f"\n{cell.stage.run}", style="dim")
    return text


def rounds_table(experiment: ExperimentState, wide: bool = True) -> Table:
    """One row per round, one column per role (select, proxy / scorer, pretrain), each cell its
    stage's status; then the round's validation loss (main line, and the decayed branch's)."""
    table = Table(box=None, padding=(0, 2), collapse_padding=True, pad_edge=False, header_style="bold")
    table.add_column("round", justify="right", no_wrap=True)
    columns = experiment.columns()
    for header, _ in columns:
        table.add_column(header, no_wrap=True)
    table.add_column("val loss", justify="right", no_wrap=True)
    table.add_column("decay", justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    if not experiment.stages:
        table.add_row(Text(_waiting_for_plan(experiment), style="dim"))
        return table
    results = {result.round: result for result in experiment.round_summary()}
    for row in experiment.rounds():
        cells: list[RenderableType] = [Text(str(row.round), style="bold")]
        for header, _ in columns:
            shown = [stage_cell_text(cell, wide) for cell in row.cells[header]]
            cells.append(Text("\n").join(shown) if shown else Text("—", style="dim"))
        result = results.get(row.round)
        decay = experiment.branch_loss(row.round)
        cells += [
            _loss(result.val_loss if result else None),
            _loss(decay),
            human_number(result.tokens) if result and result.tokens is not None else "—",
        ]
        table.add_row(*cells)
    return table


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _waiting_for_plan(experiment: ExperimentState) -> str:
    where = experiment.path / "experiment.json" if experiment.path is not None else "experiment.json"
    if experiment.problem:
        return f"{experiment.problem}: waiting for {where}"
    return f"waiting for {where}" if experiment.plan is None else "the plan has no stages yet"


def experiment_notes(experiment: ExperimentState) -> list[Text]:
    """What the reader should know that the table does not show: errors, a bad plan file."""
    notes = []
    if experiment.problem and experiment.plan is not None:
        notes.append(Text(f"{experiment.problem}; showing the last plan read", style="yellow"))
    if experiment.plan is not None and experiment.plan.skipped:
        notes.append(Text(f"{experiment.plan.skipped} stage entries of the plan not understood", style="yellow"))
    for stage in experiment.stages:
        cell = experiment.cell(stage)
        if cell.status == "error":
            notes.append(Text(f"{stage.run}: {cell.message or 'error'}", style="bold red"))
    return notes


def round_results_table(experiment: ExperimentState) -> Table | None:
    """The per-round results of ``rounds-result.json``; ``None`` before it is written."""
    if not experiment.result:
        return None
    table = Table(box=None, padding=(0, 2), collapse_padding=True, pad_edge=False, header_style="bold")
    for header in ("round", "val loss", "tokens", "threshold", "drift ρ", "cost CPU", "composition (largest shares)"):
        table.add_column(header, justify="left" if header.startswith("composition") else "right", no_wrap=True)
    for result in experiment.result:
        composition = "  ".join(f"{source} {100 * share:.0f}%" for source, share in result.composition[:4])
        table.add_row(
            str(result.round),
            _loss(result.val_loss),
            human_number(result.tokens),
            "—" if result.threshold is None else f"{result.threshold:.3g}",
            "—" if result.drift_spearman is None else f"{result.drift_spearman:.3f}",
            human_duration(result.cost_cpu_s),
            composition or "—",
        )
    return table


def experiment_summary(experiment: ExperimentState, now: float | None = None) -> Panel:
    """Everything ``--once`` prints about an experiment: its rounds, then the per-round results."""
    parts: list[RenderableType] = [rounds_table(experiment, wide=False)]
    results = round_results_table(experiment)
    if results is not None:
        parts += [Text(""), Text("per-round results (rounds-result.json)", style="bold"), results]
    parts += experiment_notes(experiment)
    parts += [Text(""), run_footer(experiment, now)]
    plan = experiment.plan
    label = f" ({plan.kind}: {plan.name})" if plan is not None and plan.name and plan.name != experiment.name else ""
    title = Text.assemble(Text(experiment.name, style="bold"), label, " ", status_text(experiment.status))
    return Panel(Group(*parts), title=title, title_align="left", subtitle=str(experiment.path or ""))


def comparison_table(series: list[Series]) -> Table:
    """Each overlaid source's last validation loss, the loss of each at equal tokens, and the latest
    evaluation-branch loss (the decayed model's) of those that have one."""
    tokens = common_tokens(series)
    table = Table(box=None, padding=(0, 2), collapse_padding=True, pad_edge=False, header_style="bold")
    table.add_column("run", no_wrap=True)
    table.add_column("val loss", justify="right", no_wrap=True)
    table.add_column("at tokens", justify="right", no_wrap=True)
    if tokens is not None:
        table.add_column(f"at {human_number(tokens)} tokens", justify="right", no_wrap=True)
    branches = sorted({name for one in series for name in one.branches})[:2]
    for name in branches:
        table.add_column(f"{name} branch", justify="right", no_wrap=True)
    best = None
    if tokens is not None:
        best = min((loss for one in series if (loss := one.loss_at(tokens)) is not None), default=None)
    for one in series:
        x, y = one.last
        row: list[RenderableType] = [Text(one.label, style="bold"), _loss(y), human_number(x)]
        if tokens is not None:
            at = one.loss_at(tokens)
            row.append(Text(_loss(at), style="bold green" if at is not None and at == best else ""))
        for name in branches:
            points = one.branches.get(name)
            row.append(f"{_loss(points[1][-1])} at {human_number(points[0][-1])}" if points else "—")
        table.add_row(*row)
    return table
