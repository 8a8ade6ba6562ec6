"""RunState: the pure fold of events the dashboard shows, over fixture runs and hostile input."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tui.events import Event, read_all
from tui.state import CURVE_POINTS, MAX_STAGES, SPARKLINE_POINTS, Curve, RunState

FIXTURES = Path(__file__).parent / "fixtures"


def folded(name: str) -> RunState:
    run = RunState(name, FIXTURES / name)
    run.fold_all(read_all(FIXTURES / name / "events.jsonl").events)
    return run


def event(stage: str, kind: str, ts: float | None = 100.0, **data) -> Event:
    return Event(ts=ts, stage=stage, kind=kind, data={"ts": ts, "stage": stage, "kind": kind, **data})


def test_full_run_fixture_shows_every_stage_in_order_with_its_status():
    run = folded("full-run")
    assert list(run.stages) == ["train-scorer", "select", "pretrain"]
    assert [stage.status for stage in run.stages.values()] == ["done", "done", "running"]
    assert run.status == "running"
    pretrain = run.stages["pretrain"]
    assert pretrain.fraction == pytest.approx(0.6)  # step 1200 of total_steps 2000
    assert pretrain.rate == pytest.approx(2.5) and pretrain.rate_unit == "steps/s"  # 10 steps per 4 s
    assert pretrain.eta_s == pytest.approx(800 / 2.5)
    assert run.stages["select"].figures["docs_kept"] > 0


def test_loss_curves_follow_their_stages():
    run = folded("full-run")
    upper_x, upper_y = run.curves["scorer upper (val)"].points()
    lower_x, _ = run.curves["scorer lower"].points()
    assert len(upper_x) == len(lower_x) == 200
    assert upper_y[-1] < upper_y[0]  # the fixture's loss falls, and so must the plotted one
    assert len(run.curves["scorer warm-up"]) == 20
    assert run.curves["pretrain loss"].last[0] == 1200
    assert run.curves["pretrain val loss"].points()[0] == [100.0 * i for i in range(1, 13)]


def test_select_threshold_arrives_late_and_is_not_lost_to_a_later_histogram():
    run = RunState("r")
    edges = [0.0, 0.25, 0.5, 0.75, 1.0]
    run.fold(event("select", "histogram", edges=edges, counts=[1, 2, 3, 4], threshold=None))
    assert run.histogram().threshold is None
    run.fold(event("select", "done", threshold=0.5, docs_kept=7))
    assert run.threshold() == 0.5
    assert run.histogram().fraction_above(0.5) == pytest.approx(0.7)
    run.fold(event("select", "histogram", edges=edges, counts=[2, 2, 3, 4], threshold=None))
    assert run.histogram().threshold == 0.5
    assert run.histogram().counts == (2, 2, 3, 4)


def test_select_histogram_is_preferred_over_the_scorer_probe_histogram():
    run = folded("full-run")
    assert set(run.histograms) == {"train-scorer", "select"}
    assert run.histogram().stage == "select"
    assert run.histogram().threshold == 0.71


def test_select_alone_gives_progress_eta_and_throughput():
    run = RunState("r")
    run.fold(event("select", "start", ts=0.0, shards=8, budget="30%"))
    for second in range(1, 5):
        run.fold(
            event(
                "select",
                "progress",
                ts=float(second),
                fraction=0.1 * second,
                docs_per_s=5000.0 + second,
                tokens_per_s=1.4e6,
                mb_per_s=11.2,
            )
        )
    select = run.stages["select"]
    assert select.fraction == pytest.approx(0.4)
    assert select.rate == 5004.0 and select.rate_unit == "docs/s"
    assert select.eta_s == pytest.approx(6.0)  # 10% a second, 60% to go
    assert select.elapsed_s == pytest.approx(4.0)
    assert run.throughput["docs_per_s"].current == 5004.0
    assert list(run.throughput["mb_per_s"].recent) == [11.2] * 4


def test_rate_and_eta_come_from_step_over_total_steps_without_a_fraction():
    run = RunState("r")
    run.fold(event("pretrain", "step", ts=10.0, step=100, total_steps=1000, loss=4.0))
    run.fold(event("pretrain", "step", ts=20.0, step=150, total_steps=1000, loss=3.9))
    stage = run.stages["pretrain"]
    assert stage.fraction == pytest.approx(0.15)
    assert stage.rate == pytest.approx(5.0) and stage.rate_unit == "steps/s"
    assert stage.eta_s == pytest.approx(850 / 5.0)


def test_throughput_sparkline_restarts_when_another_stage_reports():
    run = RunState("r")
    run.fold(event("select", "progress", fraction=0.5, tokens_per_s=1.4e6))
    run.fold(event("pretrain", "step", step=1, total_steps=10, loss=9.0, tokens_per_s=2e5))
    tokens = run.throughput["tokens_per_s"]
    assert tokens.stage == "pretrain" and list(tokens.recent) == [2e5]


def test_error_and_interrupted_are_shown_with_their_message():
    run = RunState("r")
    run.fold(event("select", "progress", fraction=0.2))
    run.fold(event("select", "error", message="shard 3: truncated zstd frame"))
    assert run.status == "error"
    assert run.stages["select"].message == "shard 3: truncated zstd frame"
    run.fold(event("pretrain", "interrupted"))
    assert run.stages["pretrain"].status == "interrupted"


def test_eval_results_are_kept_and_the_eval_stage_is_done():
    run = folded("pretrain-done")
    assert run.evaluation == {"loss_val": 3.41, "perplexity": 30.3, "bits_per_byte": 1.12}
    assert run.stages["eval"].status == "done"
    assert run.stages["pretrain"].fraction == 1.0


def test_unknown_stages_kinds_and_bad_field_types_are_tolerated():
    run = RunState("r")
    run.fold(event("tokenize", "progress", fraction=0.3, shards_done=2, weird={"x": 1}))
    run.fold(event("select", "sparkle", glitter=7))
    run.fold(event("pretrain", "step", step="twelve", total_steps=None, loss="nan", lr=float("nan")))
    run.fold(event("select", "histogram", edges=[0, 1], counts=[1, 2]))  # edges one short
    run.fold(event("select", "histogram", edges="0..1", counts=None))
    run.fold(event("?", "?", ts=None))
    assert run.stages["tokenize"].fraction == pytest.approx(0.3)
    assert run.stages["select"].figures["glitter"] == 7  # shown generically
    assert run.stages["pretrain"].fraction is None
    assert len(run.curves["pretrain loss"]) == 0
    assert run.histogram() is None
    assert run.events == 6


def test_stage_table_is_bounded_against_endless_stage_names():
    run = RunState("r")
    for index in range(MAX_STAGES * 3):
        run.fold(event(f"stage-{index}", "progress", fraction=0.5))
    assert len(run.stages) == MAX_STAGES
    assert run.ignored == MAX_STAGES * 2


def test_restart_forgets_everything_but_counts_it():
    run = folded("full-run")
    run.restart()
    assert run.stages == {} and run.events == 0 and run.histogram() is None
    assert len(run.curves["pretrain loss"]) == 0
    assert run.restarts == 1


def test_burst_of_20000_events_stays_bounded_and_keeps_the_whole_curve():
    run = RunState("r")
    events = [
        event(
            "pretrain",
            "step",
            ts=float(i),
            step=i,
            total_steps=20_000,
            loss=10.0 - i / 4000,
            tokens_per_s=1e5 + i,
        )
        for i in range(1, 20_001)
    ]
    started = time.perf_counter()
    run.fold_all(events)
    assert time.perf_counter() - started < 5.0
    curve = run.curves["pretrain loss"]
    xs, ys = curve.points()
    assert len(curve) <= CURVE_POINTS
    assert xs[0] == 1 and xs[-1] == 20_000  # thinned evenly, first and latest points kept
    assert len(run.throughput["tokens_per_s"].recent) == SPARKLINE_POINTS
    assert run.stages["pretrain"].fraction == 1.0


def test_curve_thins_evenly():
    curve = Curve(capacity=8)
    for x in range(100):
        curve.append(float(x), float(x))
    xs, _ = curve.points()
    assert len(xs) <= 9
    gaps = {b - a for a, b in zip(xs[:-2], xs[1:-1], strict=True)}
    assert len(gaps) == 1  # evenly spaced, apart from the latest point appended at the end
    assert xs[-1] == 99


def test_train_scorer_fraction_over_warmup_and_steps_wins_over_step_counts():
    # engine/bliss/train.py sends `progress` with one fraction over warm-up and outer steps, between
    # its `warmup`/`step` events: the bar must not jump between the two measures.
    events = [e for e in read_all(FIXTURES / "full-run" / "events.jsonl").events if e.stage == "train-scorer"]
    run = RunState("r")
    fractions = []
    for e in events:
        run.fold(e)
        if run.stages["train-scorer"].reports_fraction:
            fractions.append(run.stages["train-scorer"].fraction)
        if e.kind == "warmup" and e.data["step"] == 10:
            assert run.stages["train-scorer"].phase == "warm-up"
        if e.kind == "progress" and e.data["fraction"] == round(120 / 220, 5):
            stage = run.stages["train-scorer"]
            assert stage.phase == "" and stage.rate == 0.8
            assert stage.eta_s == pytest.approx(100 * 1.25, rel=0.05)  # 100 steps of 1.25 s to go
    assert len(fractions) > 400 and fractions == sorted(fractions) and fractions[-1] == 1.0


def test_stopped_pretraining_is_finished_not_running():
    run = RunState("r")
    run.fold(event("pretrain", "step", step=50, total_steps=100, loss=3.0))
    run.fold(event("pretrain", "stopped", step=50))
    assert run.stages["pretrain"].status == "stopped" and run.stages["pretrain"].finished
