"""Experiments and the overlay on screen (``App.run_test()``) and in ``--once``: stages that start while
the dashboard watches reach the rounds table; several runs' curves share one chart."""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from pathlib import Path

from rich.console import Console
from rounds_fixture import (
    STAGES,
    append_events,
    pretrain_events,
    select_events,
    write_experiment,
    write_plan,
)
from typer.testing import CliRunner

from blissctl.cli import app as cli
from tui.app import DashboardApp
from tui.experiment import ExperimentState
from tui.runs import RunSource
from tui.widgets import CompareTable, RoundsPanel, RunList, StagesPanel, TokensLossChart

FIXTURES = Path(__file__).parent / "fixtures"
OUTPUT = Path(__file__).parents[1] / "output"
REFRESH_S = 0.05
runner = CliRunner()


def text_of(widget) -> str:
    console = Console(width=200, file=io.StringIO(), record=True, color_system=None)
    console.print(widget.content)
    return console.export_text()


def rounds_text(app: DashboardApp) -> str:
    return text_of(app.screen_stack[0].query_one(RoundsPanel))


async def wait_until(pilot, condition, timeout: float = 5.0) -> None:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true after {timeout}s")
        await pilot.pause(0.02)


def now_events(events: list[dict]) -> list[dict]:
    """The events moved to now, so the dashboard sees a live run."""
    shift = time.time() - events[-1]["ts"]
    return [{**event, "ts": event["ts"] + shift} for event in events]


def test_stages_that_start_while_watching_reach_the_rounds_table_and_the_chart(tmp_path):
    root = tmp_path / "runs" / "bliss-rounds"
    write_plan(root)

    async def scenario():
        app = DashboardApp([RunSource("bliss-rounds", root)], refresh_s=REFRESH_S)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_until(pilot, lambda: "r1-lm" in rounds_text(app))
            assert app.query_one("#experiment-view").display and not app.query_one("#run-view").display
            assert "running" not in rounds_text(app) and "waiting" in rounds_text(app)
            assert "2 rounds" in str(app.query_one(RunList).get_option_at_index(0).prompt)

            append_events(root / "r0-select", now_events(select_events(0.0, done=False)))
            await wait_until(pilot, lambda: "● 75%" in rounds_text(app))
            append_events(root / "r0-select", now_events([{"ts": 0.0, "stage": "select", "kind": "done"}]))
            await wait_until(pilot, lambda: "✔ done" in rounds_text(app))

            chart = app.query_one("#experiment-loss", TokensLossChart)
            assert chart.shown_series == []
            append_events(root / "r0-lm", now_events(pretrain_events(0.0, 0)))
            await wait_until(pilot, lambda: chart.shown_series and chart.shown_series[0][1] == 4)
            assert chart.shown_branch_points == 1  # the decayed branch: a marked point, not the line
            append_events(root / "r1-lm", now_events(pretrain_events(0.0, 1, upto=20)))
            await wait_until(pilot, lambda: chart.shown_series[0][1] == 6)  # round 1 joins the line
            assert "● 50%" in rounds_text(app)

            # A torn rewrite of the plan: the table stays, and says why it did not change.
            (root / "experiment.json").write_bytes(b'{"kind": "rounds", "stages": [{"rou')
            await wait_until(pilot, lambda: "not readable JSON" in rounds_text(app))
            assert "r1-lm" in rounds_text(app)

    asyncio.run(scenario())


def test_a_folder_named_before_its_plan_is_written_becomes_an_experiment(tmp_path):
    root = tmp_path / "runs" / "later"

    async def scenario():
        app = DashboardApp([RunSource("later", root)], refresh_s=REFRESH_S)
        async with app.run_test(size=(140, 40)) as pilot:
            await pilot.pause(0.2)
            assert not isinstance(app.runs["later"], ExperimentState)
            write_experiment(root)
            await wait_until(pilot, lambda: isinstance(app.runs["later"], ExperimentState))
            panel = app.screen_stack[0].query_one(RoundsPanel)
            await wait_until(pilot, lambda: "6/6 stages finished" in str(panel.border_subtitle))
            assert "✔ done" in rounds_text(app) and app.query_one("#experiment-view").display
            # rounds-result.json is written after the last stage's events, as rounds writes it: a refresh
            # may fall between the two, so the results table is waited for, not expected at once.
            await wait_until(pilot, lambda: "per-round results" in rounds_text(app))
            assert "books 70%" in rounds_text(app)

    asyncio.run(scenario())


def test_the_overlay_shows_each_run_in_its_own_colour_and_c_toggles_it(tmp_path):
    runs = tmp_path / "runs"
    append_events(runs / "demo-bliss-lm", pretrain_events(time.time() - 60, 0, with_tokens=False))  # older engine
    random_lm = pretrain_events(time.time() - 60, 0, decay=False)
    for record in random_lm:
        if record["kind"] == "eval":
            record["loss_val"] += 0.4
    append_events(runs / "demo-random-lm", random_lm)
    write_experiment(runs / "bliss-rounds")
    shutil.copytree(FIXTURES / "select-only", runs / "select-only")
    names = ["demo-bliss-lm", "demo-random-lm", "bliss-rounds", "select-only"]

    async def scenario():
        app = DashboardApp([RunSource(name, runs / name) for name in names], refresh_s=REFRESH_S, compare=True)
        async with app.run_test(size=(160, 48)) as pilot:
            overlay = app.query_one("#overlay", TokensLossChart)
            await wait_until(pilot, lambda: len(overlay.shown_series) == 3)
            assert app.query_one("#compare-view").display and not app.query_one("#run-view").display
            labels = [label for label, _, _ in overlay.shown_series]
            assert labels == ["demo-bliss-lm", "demo-random-lm", "bliss-rounds"]  # select-only: no curve
            assert len({color for _, _, color in overlay.shown_series}) == 3
            assert [points for _, points, _ in overlay.shown_series] == [4, 4, 8]
            table = text_of(app.query_one(CompareTable))
            # 40 steps of 4,096 tokens: all three compared where each has reached, at 164k tokens
            assert "at 164k tokens" in table and "demo-random-lm" in table
            assert "compare 4 runs" in app.sub_title

            await pilot.press("c")  # each run again
            await wait_until(pilot, lambda: app.query_one("#run-view").display)
            assert "pretrain" in text_of(app.query_one(StagesPanel))
            await pilot.press("c")
            await wait_until(pilot, lambda: app.query_one("#compare-view").display)
            await pilot.press("tab")  # choosing a run leaves the overlay
            await wait_until(pilot, lambda: app.query_one("#run-view").display)
            assert app.selected == "demo-random-lm" and not app.compare
            await pilot.press("tab")
            await wait_until(pilot, lambda: app.query_one("#experiment-view").display)

    asyncio.run(scenario())


def test_runs_named_together_are_overlaid_once_two_have_curves_until_c_says_otherwise(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURES / "select-only", runs / "c4-bliss")
    append_events(runs / "bliss-lm", now_events(pretrain_events(0.0, 0)))
    names = ["c4-bliss", "bliss-lm", "random-lm"]  # random-lm has not started

    async def scenario():
        app = DashboardApp([RunSource(name, runs / name) for name in names], refresh_s=REFRESH_S, compare=True)
        async with app.run_test(size=(140, 40)) as pilot:
            await wait_until(pilot, lambda: "bliss-lm" in app.runs and app.runs["bliss-lm"].events > 0)
            await pilot.pause(0.2)
            assert app.query_one("#run-view").display  # one curve: nothing to overlay yet
            append_events(runs / "random-lm", now_events(pretrain_events(0.0, 0, upto=10)))
            await wait_until(pilot, lambda: app.query_one("#compare-view").display)
            assert "compare 3 runs" in app.sub_title
            await pilot.press("c")
            await wait_until(pilot, lambda: app.query_one("#run-view").display)
            append_events(runs / "random-lm", now_events(pretrain_events(0.0, 0)))
            await pilot.pause(0.3)
            assert app.query_one("#run-view").display  # chosen by the user: it no longer switches itself

    asyncio.run(scenario())


def test_discovery_follows_an_experiment_as_one_entry_and_screenshots(tmp_path):
    runs = tmp_path / "runs"
    root = runs / "bliss-rounds"
    write_plan(root, timings={"r0-select": {"wall_s": 3.1, "cpu_s": 5.0}})
    for run, events in (("r0-select", select_events(0.0)), ("r0-lm", pretrain_events(0.0, 0)),
                        ("r1-lm", pretrain_events(0.0, 1, upto=30, done=False))):
        append_events(root / run, now_events(events))
    append_events(runs / "demo-random-lm", now_events(pretrain_events(0.0, 0)))

    async def scenario():
        app = DashboardApp([], discover_root=runs, refresh_s=REFRESH_S, discover_every_s=0.1)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_until(pilot, lambda: app.query_one(RunList).option_count == 2)
            assert sorted(app.runs) == ["bliss-rounds", "demo-random-lm"]  # not its stage runs
            if app.selected != "bliss-rounds":
                await pilot.press("tab")
            chart = app.query_one("#experiment-loss", TokensLossChart)
            await wait_until(pilot, lambda: chart.shown_series and chart.shown_series[0][1] == 7)
            await wait_until(pilot, lambda: "● 75%" in rounds_text(app))
            await wait_until(pilot, lambda: len(app.query("FooterKey")) >= 5)
            await pilot.pause(0.1)
            OUTPUT.mkdir(exist_ok=True)
            experiment_svg = Path(app.save_screenshot("dashboard-experiment.svg", path=str(OUTPUT))).read_text()
            await pilot.press("c")
            overlay = app.query_one("#overlay", TokensLossChart)
            await wait_until(pilot, lambda: len(overlay.shown_series) == 2)
            await pilot.pause(0.1)
            compare_svg = Path(app.save_screenshot("dashboard-compare.svg", path=str(OUTPUT))).read_text()
        experiment_svg = experiment_svg.replace("&#160;", " ")
        for seen in ("proxy / scorer", "r1-lm", "round 1: pretrain", "decay branch", "Compare"):
            assert seen in experiment_svg, seen
        compare_svg = compare_svg.replace("&#160;", " ")
        for seen in ("bliss-rounds", "demo-random-lm", "validation loss against tokens"):
            assert seen in compare_svg, seen

    asyncio.run(scenario())


def test_once_prints_the_rounds_table_the_results_and_the_comparison(tmp_path):
    runs = tmp_path / "runs"
    write_experiment(runs / "bliss-rounds")
    write_experiment(runs / "random-rounds", finished=False)
    result = runner.invoke(cli, ["dashboard", "--once", "--runs-dir", str(runs), "bliss-rounds",
                                 str(runs / "random-rounds")], env={"COLUMNS": "140"})
    assert result.exit_code == 0, result.output
    out = result.output
    for seen in ("round", "select", "proxy / scorer", "pretrain", "✔ done", "● 50%", "val loss", "decay"):
        assert seen in out, seen
    assert "per-round results (rounds-result.json)" in out  # the finished one only
    assert out.count("per-round results") == 1
    assert "0.812" in out and "books 70%" in out and "1m35s" in out  # drift, composition, cost of round 1
    assert "6/6 stages finished" in out and "5/6 stages finished" in out
    # the unfinished one stopped half-way through round 1: 1.5 rounds of 40 steps × 4,096 tokens
    assert "validation loss against tokens" in out and "at 246k tokens" in out


def test_once_on_a_half_written_experiment_and_a_stage_run_alone(tmp_path):
    runs = tmp_path / "runs"
    (runs / "planned-only").mkdir(parents=True)
    (runs / "planned-only" / "experiment.json").write_bytes(b'{"kind": "rounds", "stag')  # torn
    write_experiment(runs / "bliss-rounds")
    result = runner.invoke(cli, ["dashboard", "--once", "--runs-dir", str(runs)], env={"COLUMNS": "140"})
    assert result.exit_code == 0, result.output
    assert "not readable JSON" in result.output and "Traceback" not in result.output
    assert "r0-select" not in result.output.split("bliss-rounds")[0]  # stage runs are not listed alone

    alone = runner.invoke(cli, ["dashboard", "--once", str(runs / "bliss-rounds" / "r1-lm")], env={"COLUMNS": "140"})
    assert alone.exit_code == 0 and "r1-lm" in alone.output and "decay_loss_val" in alone.output
    assert len(STAGES) == 6
