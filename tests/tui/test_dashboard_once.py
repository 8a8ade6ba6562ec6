"""``blissctl dashboard --once``: a printed summary per run, and clear errors for bad arguments."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from typer.testing import CliRunner

from blissctl.cli import app
from tui.runs import discover_runs, run_source

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def copy_runs(tmp_path: Path, *names: str) -> Path:
    runs = tmp_path / "runs"
    for name in names:
        shutil.copytree(FIXTURES / name, runs / name)
    return runs


def test_once_prints_stages_figures_and_histogram_of_every_run(tmp_path):
    runs = copy_runs(tmp_path, "full-run", "select-only")
    result = runner.invoke(app, ["dashboard", "--once", "--runs-dir", str(runs)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "full-run" in out and "select-only" in out
    for stage in ("train-scorer", "select", "pretrain"):
        assert stage in out
    assert "60.0%" in out  # pretrain at step 1200 of 2000
    assert "threshold 0.71 keeps" in out
    assert "◀ 0.71" in out  # the text histogram marks the threshold bin
    assert "█" in out
    assert "step 1200/2000" in out


def test_once_with_a_run_path_and_a_name(tmp_path):
    runs = copy_runs(tmp_path, "pretrain-done", "select-only")
    result = runner.invoke(
        app, ["dashboard", "--once", "--runs-dir", str(runs), "select-only", str(runs / "pretrain-done")]
    )
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "select-only" in result.output


def test_once_names_a_missing_run_in_one_line(tmp_path):
    result = runner.invoke(app, ["dashboard", "--once", "--runs-dir", str(tmp_path), "nope"])
    assert result.exit_code == 2
    assert "no run directory" in result.output and "Traceback" not in result.output


def test_once_without_runs_says_where_it_looked(tmp_path):
    result = runner.invoke(app, ["dashboard", "--once", "--runs-dir", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "no runs under" in result.output


def test_bad_refresh_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["dashboard", "--refresh", "0", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--refresh" in result.output


def test_runs_are_discovered_newest_first_and_names_resolve(tmp_path):
    runs = copy_runs(tmp_path, "full-run", "select-only", "pretrain-done")
    for age, name in enumerate(["select-only", "pretrain-done", "full-run"]):
        stamp = 1_800_000_000 - 1000 * age
        os.utime(runs / name / "events.jsonl", (stamp, stamp))
    assert [source.name for source in discover_runs(runs)] == ["select-only", "pretrain-done", "full-run"]
    assert run_source("c4-random", runs).path == runs / "c4-random"  # may not exist yet
    assert run_source(str(runs / "full-run"), Path("elsewhere")).name == "full-run"


def test_live_view_follows_named_runs_or_discovers_all(tmp_path, monkeypatch):
    import tui.app

    calls = []
    monkeypatch.setattr(tui.app, "run_dashboard", lambda *args, **kwargs: calls.append((args, kwargs)))
    runs = tmp_path / "runs"
    assert runner.invoke(app, ["dashboard", "--runs-dir", str(runs), "--refresh", "0.5"]).exit_code == 0
    assert runner.invoke(app, ["dashboard", "--runs-dir", str(runs), "later", "later"]).exit_code == 0
    assert runner.invoke(app, ["dashboard", "--runs-dir", str(runs), "bliss-lm", "random-lm"]).exit_code == 0
    (all_sources,), discover_all = calls[0]
    assert all_sources == [] and discover_all == {"discover_root": runs, "refresh_s": 0.5, "compare": False}
    (named,), discover_named = calls[1]
    assert [(s.name, s.path) for s in named] == [("later", runs / "later")]  # named twice, followed once
    assert discover_named["discover_root"] is None and discover_named["compare"] is False
    (pair,), compare_pair = calls[2]
    assert [s.name for s in pair] == ["bliss-lm", "random-lm"] and compare_pair["compare"] is True  # side by side


def test_dashboard_imports_no_training_code():
    # The dashboard sits beside a long run: it must start fast and never load torch or the engine.
    import subprocess
    import sys

    code = (
        "import sys, tui.app, tui.once; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'engine', 'transformers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
