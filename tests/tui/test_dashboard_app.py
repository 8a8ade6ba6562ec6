"""The live dashboard under ``App.run_test()``: events appended while it runs must reach the widgets."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import time
from pathlib import Path

import orjson
from rich.console import Console

from tui.app import DashboardApp
from tui.runs import RunSource
from tui.state import CURVE_POINTS
from tui.widgets import HelpScreen, LossChart, RunList, ScoreHistogramChart, StagesPanel

FIXTURES = Path(__file__).parent / "fixtures"
OUTPUT = Path(__file__).parents[1] / "output"
REFRESH_S = 0.05


def line(stage: str, kind: str, ts: float | None = None, **figures) -> bytes:
    return (
        orjson.dumps({"ts": time.time() if ts is None else ts, "stage": stage, "kind": kind, **figures})
        + b"\n"
    )


def append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as file:
        file.write(data)


def stages_text(app: DashboardApp) -> str:
    console = Console(width=220, file=io.StringIO(), record=True, color_system=None)
    console.print(app.screen_stack[0].query_one(StagesPanel).content)
    return console.export_text()


async def wait_until(pilot, condition, timeout: float = 5.0) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true after {timeout}s")
        await pilot.pause(0.02)
    return time.monotonic() - started


def run(coroutine) -> None:
    asyncio.run(coroutine)


def test_appended_select_events_reach_the_widgets_within_a_second(tmp_path):
    events = tmp_path / "runs" / "c4-random" / "events.jsonl"
    append(events, line("select", "start", shards=8, budget="30%", unit="tokens", scorer="random"))

    async def scenario():
        app = DashboardApp([RunSource("c4-random", events.parent)], refresh_s=REFRESH_S)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_until(pilot, lambda: "select" in stages_text(app))
            append(
                events,
                line(
                    "select",
                    "progress",
                    fraction=0.42,
                    docs_seen=48000,
                    docs_per_s=5300.0,
                    tokens_per_s=1.4e6,
                    mb_per_s=11.2,
                    shards_done=3,
                    shards_total=8,
                ),
            )
            assert await wait_until(pilot, lambda: "42.0%" in stages_text(app)) < 1.0
            assert "5.3k" in str(app.query_one("#docs_per_s-value").render())

            histogram = app.query_one(ScoreHistogramChart)
            edges = [i / 10 for i in range(11)]
            append(events, line("select", "histogram", edges=edges, counts=[1] * 10, threshold=None))
            await wait_until(pilot, lambda: histogram.shown_bins == 10)
            assert histogram.shown_threshold is None
            append(events, line("select", "histogram", edges=edges, counts=[2] * 10, threshold=0.7))
            await wait_until(pilot, lambda: histogram.shown_threshold == 0.7)

            chart = app.query_one("#scorer-loss", LossChart)
            assert chart.shown_points == 0
            append(
                events, line("train-scorer", "step", step=1, total_steps=10, loss_lower=3.1, loss_upper=3.4)
            )
            append(
                events, line("train-scorer", "step", step=2, total_steps=10, loss_lower=3.0, loss_upper=3.3)
            )
            await wait_until(pilot, lambda: chart.shown_points == 4)
            assert "train-scorer" in stages_text(app)

    run(scenario())


def test_waits_for_a_run_directory_that_does_not_exist_yet(tmp_path):
    run_dir = tmp_path / "runs" / "later"

    async def scenario():
        app = DashboardApp([RunSource("later", run_dir)], refresh_s=REFRESH_S)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.2)
            assert "waiting for" in stages_text(app)
            append(run_dir / "events.jsonl", line("select", "progress", fraction=0.25))
            await wait_until(pilot, lambda: "25.0%" in stages_text(app))

    run(scenario())


def test_half_written_line_and_garbage_do_not_break_the_view(tmp_path):
    events = tmp_path / "r" / "events.jsonl"
    whole = line("select", "progress", fraction=0.6)
    append(events, line("select", "progress", fraction=0.5) + b"\xff garbage\n[1]\n" + whole[:20])

    async def scenario():
        app = DashboardApp([RunSource("r", events.parent)], refresh_s=REFRESH_S)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: "50.0%" in stages_text(app))
            assert app.runs["r"].bad_lines == 2
            append(events, whole[20:])
            await wait_until(pilot, lambda: "60.0%" in stages_text(app))
            assert app.runs["r"].bad_lines == 2

    run(scenario())


def test_a_quiet_run_shows_its_last_event_ageing(tmp_path):
    events = tmp_path / "r" / "events.jsonl"
    append(events, line("pretrain", "step", ts=time.time() - 5, step=10, total_steps=100, loss=5.0))

    async def scenario():
        app = DashboardApp([RunSource("r", events.parent)], refresh_s=REFRESH_S)
        async with app.run_test(size=(160, 48)) as pilot:
            panel = app.query_one(StagesPanel)

            def age() -> int | None:  # the N of "last Ns ago" in the panel's subtitle
                found = re.search(r"last (\d+)s ago", str(panel.border_subtitle))
                return int(found.group(1)) if found else None

            # At least 5 s old when first shown (a slow start may show 6 or 7), then it keeps ageing.
            await wait_until(pilot, lambda: (age() or 0) >= 5)
            first = age()
            await wait_until(pilot, lambda: age() > first, timeout=2.5)

    run(scenario())


def test_replaced_and_truncated_files_start_the_view_afresh(tmp_path):
    run_dir = tmp_path / "runs" / "full-run"
    shutil.copytree(FIXTURES / "full-run", run_dir)
    events = run_dir / "events.jsonl"

    async def scenario():
        app = DashboardApp([RunSource("full-run", run_dir)], refresh_s=REFRESH_S)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_until(pilot, lambda: "pretrain" in stages_text(app))
            replacement = run_dir / "events.new"
            replacement.write_bytes((FIXTURES / "select-only" / "events.jsonl").read_bytes())
            os.replace(replacement, events)  # a new inode
            await wait_until(pilot, lambda: "pretrain" not in stages_text(app))
            assert "select" in stages_text(app) and app.runs["full-run"].restarts == 1

            with open(events, "r+b") as file:
                file.truncate(0)
            append(events, line("pretrain", "step", step=5, total_steps=10, loss=4.0))
            await wait_until(pilot, lambda: "select" not in stages_text(app))
            assert "50.0%" in stages_text(app)

    run(scenario())


def test_keys_switch_runs_pause_following_and_show_help(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURES / "full-run", runs / "full-run")
    shutil.copytree(FIXTURES / "select-only", runs / "select-only")

    async def scenario():
        sources = [RunSource("full-run", runs / "full-run"), RunSource("select-only", runs / "select-only")]
        app = DashboardApp(sources, refresh_s=REFRESH_S)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_until(pilot, lambda: "pretrain" in stages_text(app))
            await pilot.press("tab")
            await wait_until(pilot, lambda: "pretrain" not in stages_text(app))
            assert app.selected == "select-only" and app.query_one(RunList).highlighted == 1
            await pilot.press("tab")
            assert app.selected == "full-run"

            await pilot.press("p")
            assert "PAUSED" in app.sub_title
            append(runs / "full-run" / "events.jsonl", line("eval", "eval", loss_val=3.4, perplexity=30.0))
            await wait_until(pilot, lambda: "eval" in app.runs["full-run"].stages)  # still read...
            await pilot.pause(0.2)
            assert "perplexity" not in stages_text(app)  # ...but the screen holds still
            await pilot.press("p")
            await wait_until(pilot, lambda: "perplexity" in stages_text(app))

            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            append(runs / "full-run" / "events.jsonl", line("eval", "eval", loss_val=3.3, perplexity=27.1))
            await wait_until(pilot, lambda: "27.1" in stages_text(app))  # still following under the help
            await pilot.pause(0.2)
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)
            await pilot.press("q")
        assert app.return_code == 0

    run(scenario())


def test_runs_started_later_appear_in_the_run_list(tmp_path):
    runs = tmp_path / "runs"  # does not exist yet

    async def scenario():
        app = DashboardApp([], discover_root=runs, refresh_s=REFRESH_S, discover_every_s=0.1)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.2)
            assert "no runs under" in stages_text(app)
            shutil.copytree(FIXTURES / "select-only", runs / "old")
            await wait_until(pilot, lambda: "select" in stages_text(app))
            assert app.query_one(RunList).option_count == 1
            append(runs / "new" / "events.jsonl", line("select", "start", shards=2))
            await wait_until(pilot, lambda: app.query_one(RunList).option_count == 2)
            assert [source.name for source in app.sources] == ["new", "old"]
            assert app.selected == "old"  # a new run does not steal the view

    run(scenario())


def test_burst_of_20000_events_is_folded_without_freezing_or_growing(tmp_path):
    events = tmp_path / "r" / "events.jsonl"
    append(events, line("pretrain", "start", ts=0.0))

    async def scenario():
        app = DashboardApp([RunSource("r", events.parent)], refresh_s=REFRESH_S)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.runs["r"].events == 1)
            burst = b"".join(
                line(
                    "pretrain",
                    "step",
                    ts=float(i),
                    step=i,
                    total_steps=20_000,
                    loss=10 - i / 4000,
                    tokens_per_s=1e5,
                )
                for i in range(1, 20_001)
            )
            append(events, burst)
            await wait_until(pilot, lambda: app.runs["r"].events == 20_001, timeout=20.0)
            await wait_until(pilot, lambda: "100.0%" in stages_text(app))
            assert len(app.runs["r"].curves["pretrain loss"]) <= CURVE_POINTS
            assert app.query_one("#pretrain-loss", LossChart).shown_points <= CURVE_POINTS + 1
            await pilot.press("p")  # still answering keys
            assert "PAUSED" in app.sub_title

    run(scenario())


def copy_as_if_live(source: Path, target: Path, last_event_age_s: float) -> None:
    """The fixture's events shifted in time, so the run looks like one whose last event just arrived."""
    events = [orjson.loads(raw) for raw in source.read_bytes().splitlines()]
    shift = time.time() - last_event_age_s - events[-1]["ts"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"".join(orjson.dumps({**e, "ts": e["ts"] + shift}) + b"\n" for e in events))


def test_screenshot_of_a_realistic_run(tmp_path):
    runs = tmp_path / "runs"
    for name, age in (("full-run", 2.0), ("select-only", 3600.0), ("pretrain-done", 86400.0)):
        copy_as_if_live(FIXTURES / name / "events.jsonl", runs / name / "events.jsonl", age)

    async def scenario():
        sources = [RunSource(name, runs / name) for name in ("full-run", "select-only", "pretrain-done")]
        app = DashboardApp(sources, refresh_s=REFRESH_S)
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_until(pilot, lambda: app.query_one(ScoreHistogramChart).shown_threshold == 0.71)
            await wait_until(pilot, lambda: app.query_one("#pretrain-loss", LossChart).shown_points > 100)
            await wait_until(pilot, lambda: len(app.query("FooterKey")) >= 4)  # the footer fills in late
            await pilot.pause(0.1)
            OUTPUT.mkdir(exist_ok=True)
            path = Path(app.save_screenshot("dashboard.svg", path=str(OUTPUT)))
        svg = path.read_text()
        for seen in (
            "train-scorer",
            "pretrain",
            "select-only",
            "threshold",
            "tokens/s",
            "Next run",
        ):
            assert seen in svg.replace("&#160;", " "), seen
        # the age of the last event is shown (seconds on a quick machine, more on a loaded one)
        assert re.search(r"last \d+s ago", svg.replace("&#160;", " "))

    run(scenario())
