"""An experiment: a folder of stage runs (``blissctl rounds``), read the way the dashboard reads a run.

The on-disk contract, ``RUNS/EXP/``:

- ``experiment.json``: the plan, written atomically at plan time and rewritten as stages finish:
  ``{"kind": "rounds", "name": ..., "settings": {...}, "stages": [{"round": 0, "role": "select",
  "run": "r0-select", "title": ...}, ...], "timings": {"r0-select": {"wall_s": ..., "cpu_s": ...}}}``.
  Unknown keys are ignored; a stage's run folder may not exist yet; a round may lack a role.
- ``RUNS/EXP/<run>/events.jsonl``: one ordinary run directory per stage.
- ``rounds-result.json`` (at the end, may be absent): ``{"rounds": [{"round", "val_loss", "tokens",
  "threshold", "drift_spearman", "composition": {source: share}, "cost_cpu_s"}, ...]}``.

``ExperimentReader`` turns the folder into ``ExperimentBatch`` es (a new plan or result when the file
changed, and each stage run's ``TailBatch``); ``ExperimentState.fold`` is the only way the state
changes. A torn or foreign ``experiment.json`` keeps the last good plan and says so; run names that
are not one path component are refused (a plan must not point the reader outside its folder).
Nothing here imports Textual.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tui.events import EventTail, TailBatch, as_number
from tui.state import FINISHED, Curve, RunState

EXPERIMENT_FILE = "experiment.json"
RESULT_FILE = "rounds-result.json"
MAX_JSON_BYTES = 4 << 20
"""A plan or result larger than this is not one: it is refused rather than read into memory."""
MAX_PLAN_STAGES = 256
MAX_ROUNDS = 256
MAX_TEXT = 120
MAX_COMPOSITION = 6
"""Sources kept per round's composition (the largest shares); the rest are summed as "other"."""
MAX_SWEEP_EVENTS = 20_000
"""Events one ``ExperimentReader.read`` gathers across its stage runs before it stops (``more``): a
batch stays about as large as one run's, however many stages an experiment has."""

ROLE_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("select", ("select",)),
    # Round 0 warms the proxy up, later rounds train the score model: the same place in the flow.
    ("proxy / scorer", ("proxy", "train-scorer")),
    ("pretrain", ("pretrain",)),
    ("eval", ("eval",)),
)
MAX_EXTRA_COLUMNS = 3
"""Columns for roles the table does not know; more unknown roles share an "other" column."""


def is_experiment(path: Path) -> bool:
    """Whether ``path`` is an experiment folder (it holds ``experiment.json``), not a run directory."""
    try:
        return (path / EXPERIMENT_FILE).is_file()
    except OSError:
        return False


def is_run_name(value: Any) -> bool:
    """One plain path component: a plan's ``run`` must name a folder inside the experiment."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 200
        and value not in (".", "..")
        and not any(char in value for char in "/\\\0")
    )


# --- the plan and the result -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedStage:
    round: int
    role: str
    run: str
    title: str


@dataclass(frozen=True, slots=True)
class Timing:
    wall_s: float | None
    cpu_s: float | None


@dataclass(frozen=True)
class ExperimentPlan:
    name: str
    kind: str
    stages: tuple[PlannedStage, ...]
    timings: dict[str, Timing] = field(default_factory=dict)
    skipped: int = 0
    """Stage entries not understood (no round, a run name that is not one path component, ...)."""


@dataclass(frozen=True)
class RoundResult:
    round: int
    val_loss: float | None = None
    tokens: float | None = None
    threshold: float | None = None
    drift_spearman: float | None = None
    cost_cpu_s: float | None = None
    composition: tuple[tuple[str, float], ...] = ()
    """The largest shares, largest first; ``other`` sums the rest."""


def _round_number(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        return None
    return int(value) if 0 <= value < 1_000_000 else None


def _text(value: Any, default: str = "") -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else default


def parse_plan(record: Any) -> ExperimentPlan | None:
    """``experiment.json`` as a plan; ``None`` when it is not an object with a ``stages`` list."""
    if not isinstance(record, dict) or not isinstance(record.get("stages"), list):
        return None
    stages: list[PlannedStage] = []
    skipped = 0
    for entry in record["stages"]:
        if len(stages) >= MAX_PLAN_STAGES:
            skipped += 1
            continue
        if not isinstance(entry, dict):
            skipped += 1
            continue
        number, run = _round_number(entry.get("round")), entry.get("run")
        if number is None or not is_run_name(run):
            skipped += 1
            continue
        role = _text(entry.get("role"), "other") or "other"
        stages.append(PlannedStage(number, role, run, _text(entry.get("title"))))
    timings: dict[str, Timing] = {}
    raw_timings = record.get("timings")
    if isinstance(raw_timings, dict):
        planned = {stage.run for stage in stages}
        for run, timing in raw_timings.items():
            if run in planned and isinstance(timing, dict):
                timings[run] = Timing(as_number(timing.get("wall_s")), as_number(timing.get("cpu_s")))
    return ExperimentPlan(
        name=_text(record.get("name")),
        kind=_text(record.get("kind")),
        stages=tuple(stages),
        timings=timings,
        skipped=skipped,
    )


def parse_result(record: Any) -> tuple[RoundResult, ...] | None:
    """``rounds-result.json`` as one ``RoundResult`` per round; ``None`` when it has no ``rounds`` list."""
    if not isinstance(record, dict) or not isinstance(record.get("rounds"), list):
        return None
    results = []
    for entry in record["rounds"][:MAX_ROUNDS]:
        if not isinstance(entry, dict) or (number := _round_number(entry.get("round"))) is None:
            continue
        results.append(
            RoundResult(
                round=number,
                val_loss=as_number(entry.get("val_loss")),
                tokens=as_number(entry.get("tokens")),
                threshold=as_number(entry.get("threshold")),
                drift_spearman=as_number(entry.get("drift_spearman")),
                cost_cpu_s=as_number(entry.get("cost_cpu_s")),
                composition=_composition(entry.get("composition")),
            )
        )
    return tuple(results)


def _composition(value: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, dict):
        return ()
    shares = [(str(source)[:MAX_TEXT], share) for source, raw in value.items()
              if (share := as_number(raw)) is not None]
    shares.sort(key=lambda item: -item[1])
    kept = shares[:MAX_COMPOSITION]
    rest = sum(share for _, share in shares[MAX_COMPOSITION:])
    return tuple(kept + [("other", rest)]) if rest > 0 else tuple(kept)


class JsonFile:
    """A small JSON file that is rewritten whole: ``read`` parses it again only when it changed."""

    def __init__(self, path: Path):
        self.path = path
        self._identity: tuple[int, int, int] | None = None
        self._seen = False

    def read(self) -> tuple[bool, Any, str | None]:
        """``(changed, value, problem)``: ``changed`` is false when the file is as last read; ``value``
        is ``None`` with a ``problem`` when it is missing, too large or not JSON."""
        try:
            stat = os.stat(self.path)
        except OSError:
            changed = self._seen and self._identity is not None
            self._identity = None
            self._seen = True
            return changed, None, f"{self.path.name} is missing"
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if identity == self._identity:
            return False, None, None
        self._identity, self._seen = identity, True
        if stat.st_size > MAX_JSON_BYTES:
            return True, None, f"{self.path.name} is larger than {MAX_JSON_BYTES >> 20} MB: not read"
        try:
            return True, orjson.loads(self.path.read_bytes()), None
        except (OSError, orjson.JSONDecodeError):
            # Torn (a writer that does not rename) or garbage: the next change is read again.
            return True, None, f"{self.path.name} is not readable JSON"


# --- reading the folder ------------------------------------------------------------------------------


@dataclass(slots=True)
class ExperimentBatch:
    """What one ``ExperimentReader.read`` found."""

    plan: ExperimentPlan | None = None
    """A new plan (``experiment.json`` changed and parsed); ``None`` when unchanged or unreadable."""
    plan_problem: str | None = None
    plan_checked: bool = False
    """``experiment.json`` changed: ``plan_problem`` says what is wrong with it, or is ``None``."""
    result: tuple[RoundResult, ...] | None = None
    runs: dict[str, TailBatch] = field(default_factory=dict)
    more: bool = False

    @property
    def empty(self) -> bool:
        return not (self.plan_checked or self.result is not None or self.runs)


class ExperimentReader:
    """Follows an experiment folder: its plan, its result and every planned stage run's events."""

    def __init__(self, root: Path):
        self.root = root
        self._plan_file = JsonFile(root / EXPERIMENT_FILE)
        self._result_file = JsonFile(root / RESULT_FILE)
        self._tails: dict[str, EventTail] = {}
        self._existed: dict[str, bool] = {}
        self._turn = 0

    def read(self) -> ExperimentBatch:
        batch = ExperimentBatch()
        changed, record, problem = self._plan_file.read()
        if changed:
            batch.plan_checked = True
            plan = parse_plan(record) if record is not None else None
            if plan is None:
                batch.plan_problem = problem or f"{EXPERIMENT_FILE} holds no stages list"
            else:
                batch.plan = plan
                self._follow(plan)
        changed, record, _ = self._result_file.read()
        if changed and record is not None:
            batch.result = parse_result(record)

        # Round-robin over the stage runs, so a stage with a huge backlog cannot starve the others.
        names = list(self._tails)
        gathered = 0
        for offset in range(len(names)):
            name = names[(self._turn + offset) % len(names)]
            tail_batch = self._tails[name].read()
            if (
                tail_batch.events
                or tail_batch.restarted
                or tail_batch.bad_lines
                or tail_batch.exists != self._existed.get(name)
            ):
                self._existed[name] = tail_batch.exists
                batch.runs[name] = tail_batch
            gathered += len(tail_batch.events)
            batch.more = batch.more or tail_batch.more
            if gathered >= MAX_SWEEP_EVENTS:
                self._turn = (self._turn + offset + 1) % len(names)
                batch.more = True
                break
        return batch

    def _follow(self, plan: ExperimentPlan) -> None:
        planned = list(dict.fromkeys(stage.run for stage in plan.stages))
        for name in planned:
            if name not in self._tails:
                self._tails[name] = EventTail(self.root / name / "events.jsonl")
        for name in [name for name in self._tails if name not in planned]:
            del self._tails[name]  # a rewritten plan that dropped a stage: stop following it
            self._existed.pop(name, None)
        self._turn = 0


def read_experiment(root: Path) -> ExperimentState:
    """The experiment as its files are now (for ``--once`` and tests): reads until caught up."""
    experiment = ExperimentState(root.name, root)
    reader = ExperimentReader(root)
    while True:
        batch = reader.read()
        experiment.fold(batch)
        if not batch.more:
            return experiment


# --- the state ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StageCell:
    """What the rounds table shows for one planned stage."""

    stage: PlannedStage
    status: str
    fraction: float | None = None
    seconds: float | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class RoundRow:
    round: int
    cells: dict[str, list[StageCell]]
    """Column header -> the round's stages in that column (usually one)."""


class ExperimentState:
    """Everything the dashboard shows about an experiment, folded from ``ExperimentBatch`` es."""

    def __init__(self, name: str, path: Path | str | None = None):
        self.name = name
        self.path = Path(path) if path is not None else None
        self.plan: ExperimentPlan | None = None
        self.problem: str | None = None
        """Why ``experiment.json`` could not be read last time (the last good plan is still shown)."""
        self.result: tuple[RoundResult, ...] | None = None
        self.runs: dict[str, RunState] = {}

    # --- folding -------------------------------------------------------------------------------

    def fold(self, batch: ExperimentBatch) -> None:
        if batch.plan_checked:
            self.problem = batch.plan_problem
        if batch.plan is not None:
            self.plan = batch.plan
            planned = {stage.run for stage in batch.plan.stages}
            for stage in batch.plan.stages:
                if stage.run not in self.runs:
                    path = self.path / stage.run if self.path is not None else None
                    self.runs[stage.run] = RunState(stage.run, path)
            for name in [name for name in self.runs if name not in planned]:
                del self.runs[name]
        if batch.result is not None:
            self.result = batch.result
        for name, tail_batch in batch.runs.items():
            run = self.runs.get(name)
            if run is not None:
                run.fold_batch(tail_batch)

    # --- reading -------------------------------------------------------------------------------

    @property
    def stages(self) -> tuple[PlannedStage, ...]:
        return self.plan.stages if self.plan is not None else ()

    @property
    def exists(self) -> bool:
        return self.plan is not None

    @property
    def events(self) -> int:
        return sum(run.events for run in self.runs.values())

    @property
    def bad_lines(self) -> int:
        return sum(run.bad_lines for run in self.runs.values())

    @property
    def last_ts(self) -> float | None:
        stamps = [run.last_ts for run in self.runs.values() if run.last_ts is not None]
        return max(stamps) if stamps else None

    @property
    def round_numbers(self) -> list[int]:
        return sorted({stage.round for stage in self.stages})

    def cell(self, stage: PlannedStage) -> StageCell:
        run = self.runs.get(stage.run)
        if run is None or not run.stages:
            return StageCell(stage, "waiting")
        # The stage the role names when the run has it (a pretrain run may go on to eval), else the
        # one that reported last.
        shown = run.stages.get(stage.role) or max(run.stages.values(), key=lambda s: s.last_ts or 0.0)
        timing = self.plan.timings.get(stage.run) if self.plan is not None else None
        seconds = timing.wall_s if timing is not None and timing.wall_s is not None else shown.elapsed_s
        status = run.status
        message = next((message for _, message in reversed(run.errors)), None) if status == "error" else None
        fraction = 1.0 if status == "done" else shown.fraction
        return StageCell(stage, status, fraction, seconds, message)

    def columns(self) -> list[tuple[str, tuple[str, ...]]]:
        """The table's columns: the known role groups the plan uses, in the flow's order, then unknown
        roles (a few; the rest share "other")."""
        roles = list(dict.fromkeys(stage.role for stage in self.stages))
        known = {role for _, group in ROLE_COLUMNS for role in group}
        columns = [(header, group) for header, group in ROLE_COLUMNS if any(role in roles for role in group)]
        extra = [role for role in roles if role not in known]
        columns += [(role, (role,)) for role in extra[:MAX_EXTRA_COLUMNS]]
        if len(extra) > MAX_EXTRA_COLUMNS:
            columns.append(("other", tuple(extra[MAX_EXTRA_COLUMNS:])))
        return columns

    def rounds(self) -> list[RoundRow]:
        columns = self.columns()
        rows = []
        for number in self.round_numbers:
            cells: dict[str, list[StageCell]] = {header: [] for header, _ in columns}
            for stage in self.stages:
                if stage.round != number:
                    continue
                header = next(header for header, group in columns if stage.role in group)
                cells[header].append(self.cell(stage))
            rows.append(RoundRow(number, cells))
        return rows

    @property
    def status(self) -> str:
        cells = [self.cell(stage) for stage in self.stages]
        if not cells:
            return "waiting"
        statuses = {cell.status for cell in cells}
        if "error" in statuses:
            return "error"
        if "running" in statuses:
            return "running"
        if statuses == {"done"} or self.result is not None:
            return "done"
        for paused in ("interrupted", "stopped"):
            if paused in statuses:
                return paused
        # Some stages done, the next not started yet: the experiment is between two stages.
        return "running" if "done" in statuses else "waiting"

    def pretrain_stages(self) -> list[PlannedStage]:
        """The main line's stages, in round order (the plan's order within a round)."""
        stages = [stage for stage in self.stages if stage.role == "pretrain"]
        return sorted(stages, key=lambda stage: stage.round)  # sort is stable: plan order within a round

    def main_line(self) -> tuple[list[float], list[float], list[float]]:
        """The validation loss against tokens across rounds, one line: ``(xs, ys, round_starts)``, where
        ``round_starts`` holds the tokens at which each round's training began (the first round: its
        first evaluation).

        Each round's pretrain run continues the previous round's model and counts its tokens from the
        start of round 0, so the curves simply join. A round whose tokens go back (a run that counted
        from zero, against the contract) is shifted to start where the previous round ended, so the
        line never runs back in time.
        """
        xs: list[float] = []
        ys: list[float] = []
        starts: list[float] = []
        for stage, offset in self._round_offsets():
            run_xs, run_ys = self.runs[stage.run].val_by_tokens.points()
            if not run_xs:
                continue
            # A later round starts training where the one before stopped, not at its first evaluation.
            starts.append(xs[-1] if xs else run_xs[0] + offset)
            xs.extend(x + offset for x in run_xs)
            ys.extend(run_ys)
        return xs, ys, starts

    def branch_points(self) -> dict[str, tuple[list[float], list[float]]]:
        """Each evaluation branch's points (``decay``: the round's decayed-model loss), on the main
        line's token axis."""
        points: dict[str, tuple[list[float], list[float]]] = {}
        for stage, offset in self._round_offsets():
            for branch, curve in self.runs[stage.run].branch_evals.items():
                run_xs, run_ys = curve.points()
                xs, ys = points.setdefault(branch, ([], []))
                xs.extend(x + offset for x in run_xs)
                ys.extend(run_ys)
        return points

    def _round_offsets(self) -> list[tuple[PlannedStage, float]]:
        offsets = []
        end = None
        for stage in self.pretrain_stages():
            run = self.runs.get(stage.run)
            if run is None:
                continue
            curve: Curve = run.val_by_tokens
            xs, _ = curve.points()
            offset = 0.0
            if xs and end is not None and xs[0] <= end:
                offset = end
            if xs:
                end = xs[-1] + offset
            offsets.append((stage, offset))
        return offsets

    def round_summary(self) -> list[RoundResult]:
        """One result per round: ``rounds-result.json``'s when there is one, else what the events say
        so far (the round's last main-line and its tokens)."""
        if self.result is not None:
            return list(self.result)
        summaries = []
        ends: dict[int, tuple[float, float]] = {}
        for stage, offset in self._round_offsets():
            last = self.runs[stage.run].val_by_tokens.last
            if last is not None:
                ends[stage.round] = (last[0] + offset, last[1])
        for number in self.round_numbers:
            if number in ends:
                tokens, loss = ends[number]
                summaries.append(RoundResult(round=number, val_loss=loss, tokens=tokens))
        return summaries

    def branch_loss(self, round_number: int, branch: str = "decay") -> float | None:
        """The round's latest ``branch`` evaluation loss, from its pretrain run's events."""
        for stage in reversed(self.pretrain_stages()):
            if stage.round == round_number:
                curve = self.runs[stage.run].branch_evals.get(branch) if stage.run in self.runs else None
                if curve is not None and curve.last is not None:
                    return curve.last[1]
        return None

    @property
    def finished_stages(self) -> int:
        return sum(1 for stage in self.stages if self.cell(stage).status in FINISHED)
