"""Experiments folded without Textual: the plan, the stage cells, the joined main line, decay points,
tokens for older runs, discovery, the overlay's series, and folders that are half written or hostile."""

from __future__ import annotations

import os

import orjson
import pytest
from rounds_fixture import (
    BATCH_TOKENS,
    DECAY_GAIN,
    STAGES,
    STEPS_PER_ROUND,
    append_events,
    pretrain_events,
    select_events,
    write_experiment,
    write_json,
    write_plan,
)

from tui.compare import MAX_SERIES, common_tokens, overlay_series, series_of
from tui.events import Event
from tui.experiment import (
    MAX_PLAN_STAGES,
    ExperimentReader,
    ExperimentState,
    parse_plan,
    read_experiment,
)
from tui.runs import discover_runs, run_source
from tui.state import RunState

T = 1_790_000_000.0


def event(stage: str, kind: str, ts: float = T, **data) -> Event:
    return Event(ts=ts, stage=stage, kind=kind, data={"ts": ts, "stage": stage, "kind": kind, **data})


def cells_by_run(experiment: ExperimentState) -> dict[str, tuple[str, float | None]]:
    return {cell.stage.run: (cell.status, cell.fraction)
            for row in experiment.rounds() for cells in row.cells.values() for cell in cells}


def test_a_finished_experiment_has_a_row_per_round_and_a_column_per_role(tmp_path):
    experiment = read_experiment(write_experiment(tmp_path / "bliss-rounds"))
    assert experiment.status == "done"
    assert [header for header, _ in experiment.columns()] == ["select", "proxy / scorer", "pretrain"]
    rows = experiment.rounds()
    assert [row.round for row in rows] == [0, 1]
    # round 0 warms the proxy up, round 1 trains the score model: the same column
    assert [cell.stage.run for cell in rows[0].cells["proxy / scorer"]] == ["r0-proxy"]
    assert [cell.stage.run for cell in rows[1].cells["proxy / scorer"]] == ["r1-scorer"]
    assert set(cells_by_run(experiment).values()) == {("done", 1.0)}
    assert experiment.cell(STAGES_BY_RUN["r0-select"]).seconds == 3.1  # the plan's timing wins
    assert [result.threshold for result in experiment.round_summary()] == [None, 0.42]


STAGES_BY_RUN = {stage["run"]: parse_plan({"stages": [stage]}).stages[0] for stage in STAGES}


def test_stages_go_from_waiting_to_running_to_done_as_their_runs_write(tmp_path):
    root = tmp_path / "exp"
    write_plan(root)  # planned: no stage folder exists yet
    reader, experiment = ExperimentReader(root), ExperimentState("exp", root)
    experiment.fold(reader.read())
    assert experiment.status == "waiting"
    assert set(cells_by_run(experiment).values()) == {("waiting", None)}

    append_events(root / "r0-select", select_events(T, done=False))
    experiment.fold(reader.read())
    assert cells_by_run(experiment)["r0-select"] == ("running", 0.75)
    assert experiment.status == "running"

    append_events(root / "r0-select", [{"ts": T + 9, "stage": "select", "kind": "done"}])
    append_events(root / "r0-lm", [{"ts": T + 10, "stage": "pretrain", "kind": "error", "message": "disk full"}])
    experiment.fold(reader.read())
    assert cells_by_run(experiment)["r0-select"] == ("done", 1.0)
    assert cells_by_run(experiment)["r0-lm"][0] == "error" and experiment.status == "error"
    assert experiment.cell(STAGES_BY_RUN["r0-lm"]).message == "disk full"


def test_the_main_line_joins_rounds_against_tokens_and_keeps_decay_points_apart(tmp_path):
    experiment = read_experiment(write_experiment(tmp_path / "exp"))
    xs, ys, starts = experiment.main_line()
    evals = STEPS_PER_ROUND // 10
    assert len(xs) == 2 * evals
    # Round 1's steps count from zero again, its tokens go on from round 0's: one rising line.
    assert xs == [BATCH_TOKENS * 10 * i for i in range(1, 2 * evals + 1)]
    assert starts == [BATCH_TOKENS * 10, BATCH_TOKENS * STEPS_PER_ROUND]  # round 1 begins where 0 ended
    assert ys == sorted(ys, reverse=True)
    decay_xs, decay_ys = experiment.branch_points()["decay"]
    assert decay_xs == [BATCH_TOKENS * STEPS_PER_ROUND, 2 * BATCH_TOKENS * STEPS_PER_ROUND]
    # The decayed branch is lower than the main line at the same tokens, and never part of it.
    assert decay_ys[0] == pytest.approx(ys[evals - 1] - DECAY_GAIN)
    assert decay_ys[0] not in ys
    assert experiment.branch_loss(1) == pytest.approx(decay_ys[1])
    run = experiment.runs["r1-lm"]
    assert run.stages["pretrain"].figures["loss_val"] == ys[-1]  # the main line's, not the branch's
    assert run.curves["pretrain val loss"].points()[1] == ys[evals:]


def test_older_eval_events_without_tokens_seen_fall_back_to_steps_times_batch_tokens():
    run = RunState("old")
    run.fold(event("pretrain", "start", global_batch_tokens=8192, steps=100))
    run.fold(event("pretrain", "eval", step=10, loss_val=7.5))  # no step event at 10: step × batch
    run.fold(event("pretrain", "step", step=20, loss=7.0, tokens_seen=500_000))
    run.fold(event("pretrain", "eval", step=20, loss_val=7.2))  # the step event at 20 knows better
    run.fold(event("pretrain", "eval", step=30, loss_val=7.1, tokens_seen=900_000))  # its own, first
    assert run.val_by_tokens.points() == ([81_920, 500_000, 900_000], [7.5, 7.2, 7.1])

    unknown = RunState("no-start")
    unknown.fold(event("pretrain", "eval", step=10, loss_val=7.5))
    assert unknown.val_by_tokens.points() == ([], [])  # nowhere to put it: not drawn at a made-up x


def test_a_resumed_run_evaluating_a_step_again_does_not_draw_back_in_time():
    run = RunState("resumed")
    run.fold(event("pretrain", "start", global_batch_tokens=100))
    for step, loss in ((10, 5.0), (20, 4.0), (20, 3.9), (10, 9.9), (30, 3.5)):
        run.fold(event("pretrain", "eval", step=step, loss_val=loss))
    assert run.val_by_tokens.points() == ([1000, 2000, 3000], [5.0, 3.9, 3.5])


def test_a_round_that_counts_its_tokens_from_zero_is_placed_after_the_one_before(tmp_path):
    # Against the contract (an older engine): each round's tokens start at 0. The line must still run
    # forward, not back over round 0.
    root = tmp_path / "exp"
    write_plan(root)
    append_events(root / "r0-lm", pretrain_events(T, 0, with_tokens=False))
    append_events(root / "r1-lm", pretrain_events(T + 100, 0, with_tokens=False))
    xs, _, starts = read_experiment(root).main_line()
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert starts[1] > starts[0] and xs[-1] == 2 * STEPS_PER_ROUND * BATCH_TOKENS


def test_a_torn_plan_keeps_the_last_good_one_and_says_so(tmp_path):
    root = tmp_path / "exp"
    write_plan(root)
    reader, experiment = ExperimentReader(root), ExperimentState("exp", root)
    experiment.fold(reader.read())
    assert len(experiment.stages) == len(STAGES) and experiment.problem is None

    (root / "experiment.json").write_bytes(b'{"kind": "rounds", "stages": [{"round": 0, "ro')  # torn
    experiment.fold(reader.read())
    assert len(experiment.stages) == len(STAGES)
    assert "not readable JSON" in experiment.problem

    write_plan(root, stages=STAGES[:2])
    experiment.fold(reader.read())
    assert experiment.problem is None and list(experiment.runs) == ["r0-select", "r0-lm"]  # dropped ones go

    os.remove(root / "experiment.json")
    experiment.fold(reader.read())
    assert "missing" in experiment.problem and len(experiment.stages) == 2


def test_a_half_written_folder_and_hostile_plans_never_raise(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    assert read_experiment(half).status == "waiting"  # no experiment.json yet
    (half / "experiment.json").write_bytes(b"[1, 2]")
    assert read_experiment(half).plan is None and "no stages" in read_experiment(half).problem

    hostile = [
        {"round": 0, "role": "select", "run": "../elsewhere"},  # must not read outside the folder
        {"round": 0, "role": "select", "run": "/etc"},
        {"round": True, "role": "select", "run": "a"},
        {"round": -1, "run": "b"},
        {"round": 0, "run": ""},
        "not a stage",
        {"round": 1.0, "run": "no-role", "title": 5, "extra": {"nested": [1]}},
    ]
    plan = parse_plan({"stages": hostile, "timings": {"no-role": {"wall_s": "soon"}, "x": 5}})
    assert [(stage.round, stage.role, stage.run, stage.title) for stage in plan.stages] == [
        (1, "other", "no-role", "")
    ]
    assert plan.skipped == 6 and plan.timings["no-role"].wall_s is None

    big = parse_plan({"stages": [{"round": i, "role": "select", "run": f"r{i}"} for i in range(10 * MAX_PLAN_STAGES)]})
    assert len(big.stages) == MAX_PLAN_STAGES  # memory stays bounded whatever the plan says

    root = tmp_path / "exp"
    write_plan(root, stages=[*STAGES, {"round": 2, "role": "select", "run": "r2-select"}])
    append_events(root / "r0-select", select_events(T))
    with open(root / "r0-select" / "events.jsonl", "ab") as file:
        file.write(b'{"ts": 1, "stage": "select", "kind": "pro')  # a torn last line
    write_json(root / "rounds-result.json", {"rounds": [{"round": "zero"}, {"round": 0, "val_loss": "x"}]})
    experiment = read_experiment(root)
    assert cells_by_run(experiment)["r0-select"] == ("done", 1.0)
    assert cells_by_run(experiment)["r2-select"] == ("waiting", None)  # its folder does not exist yet
    assert [row.round for row in experiment.rounds()] == [0, 1, 2]  # round 2 has only a select
    assert [(r.round, r.val_loss) for r in experiment.result] == [(0, None)]


def test_unknown_roles_get_columns_and_busy_stage_runs_do_not_starve_the_others(tmp_path, monkeypatch):
    import tui.events
    import tui.experiment

    # The same logic at a smaller scale: a read takes ~25 events, a sweep stops after 40.
    monkeypatch.setattr(tui.events, "MAX_READ_BYTES", 2000)
    monkeypatch.setattr(tui.experiment, "MAX_SWEEP_EVENTS", 40)
    root = tmp_path / "exp"
    busy = ["a", "c", "d"]
    write_plan(root, stages=[*({"round": 0, "role": "select", "run": name} for name in busy),
                             {"round": 0, "role": "audit", "run": "b"}])
    backlog = [{"ts": T + i, "stage": "select", "kind": "progress", "fraction": i / 300} for i in range(300)]
    for name in busy:
        append_events(root / name, backlog)
    append_events(root / "b", [{"ts": T, "stage": "audit", "kind": "start"}])
    reader, experiment = ExperimentReader(root), ExperimentState("exp", root)
    served, sizes = [], []
    while True:
        batch = reader.read()
        served.append(set(batch.runs))
        sizes.append(sum(len(tail.events) for tail in batch.runs.values()))
        experiment.fold(batch)
        if not batch.more:
            break
    # A sweep stops once it has gathered enough (a batch stays about one read's size), and the next
    # starts where it stopped: the quiet run is served in the second sweep, not after the backlogs.
    assert max(sizes) < 40 + 30 and len(served) > 10
    assert "b" not in served[0] and "b" in served[1]
    assert [experiment.runs[name].events for name in busy] == [300] * 3 and experiment.runs["b"].events == 1
    assert [header for header, _ in experiment.columns()] == ["select", "audit"]


def test_discovery_lists_an_experiment_once_and_its_stage_runs_stay_viewable_by_path(tmp_path):
    runs = tmp_path / "runs"
    write_experiment(runs / "bliss-rounds")
    append_events(runs / "plain", select_events(T))
    sources = discover_runs(runs)
    assert sorted(source.name for source in sources) == ["bliss-rounds", "plain"]
    assert {source.name: source.is_experiment for source in sources} == {"bliss-rounds": True, "plain": False}
    stage = run_source(str(runs / "bliss-rounds" / "r1-lm"), runs)
    assert stage.name == "r1-lm" and not stage.is_experiment and stage.events_path.is_file()
    assert run_source("bliss-rounds", runs).is_experiment


def test_the_overlay_has_one_series_per_source_against_tokens(tmp_path):
    runs = tmp_path / "runs"
    append_events(runs / "demo-bliss-lm", pretrain_events(T, 0, with_tokens=False))  # an older demo run
    random_events = pretrain_events(T, 0, decay=False)
    for record in random_events:
        if record["kind"] == "eval":
            record["loss_val"] += 0.5
    append_events(runs / "demo-random-lm", random_events)
    views: list = []
    for name in ("demo-bliss-lm", "demo-random-lm", "select-only"):
        view = RunState(name)
        for raw in (runs / name / "events.jsonl").read_bytes().splitlines() if name != "select-only" else []:
            record = orjson.loads(raw)
            view.fold(Event(record["ts"], record["stage"], record["kind"], record))
        views.append(view)
    views.append(read_experiment(write_experiment(runs / "bliss-rounds")))

    series, hidden = overlay_series(views)
    assert [one.label for one in series] == ["demo-bliss-lm", "demo-random-lm", "bliss-rounds"]  # no curve, no series
    assert hidden == 0
    bliss, random, rounds = series
    assert bliss.xs == random.xs == [BATCH_TOKENS * 10 * i for i in range(1, 5)]
    assert [r - b for b, r in zip(bliss.ys, random.ys, strict=True)] == pytest.approx([0.5] * 4)
    assert list(bliss.branches) == ["decay"] and random.branches == {}
    assert len(rounds.xs) == 8 and rounds.round_starts[1] == rounds.xs[3]
    tokens = common_tokens(series)
    assert tokens == STEPS_PER_ROUND * BATCH_TOKENS
    assert random.loss_at(tokens) - bliss.loss_at(tokens) == pytest.approx(0.5)
    assert bliss.loss_at(BATCH_TOKENS * 15) == pytest.approx((bliss.ys[0] + bliss.ys[1]) / 2)
    assert series_of(views[2]) is None

    crowd = [views[0]] * (MAX_SERIES + 3)
    shown, more = overlay_series(crowd)
    assert len(shown) == MAX_SERIES and more == 3
