"""`blissctl demo`: the chain it runs, what it reuses, and the comparison it prints.

The fast tests replace each stage's process with a fake that writes what the real command writes (the run
directory contract), so the demo's own logic is checked in milliseconds; the slow test runs it for real.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from blissctl import demo
from blissctl.cli import app
from engine.experiment import SIDE_BY_SIDE, StageExit, pinned_threads

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def append_events(run: Path, *events: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "events.jsonl", "ab") as f:
        for event in events:
            f.write(orjson.dumps({"ts": 1.0, **event}) + b"\n")


class FakeStages:
    """Stands in for `python -m blissctl STAGE ...`: records the call and writes that stage's outputs."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        runs = Path(option(argv, "--runs-dir")) if "--runs-dir" in argv else None
        stage = argv[0]
        if stage == "train-scorer":
            run = runs / option(argv, "--run")
            (run / "checkpoints").mkdir(parents=True)
            (run / "checkpoints" / "score-model.pt").write_bytes(b"x")
            (run / "tokenizer.json").write_text("{}")
            append_events(run, {"stage": "train-scorer", "kind": "start"}, {"stage": "train-scorer", "kind": "done"})
        elif stage == "select":
            run = runs / option(argv, "--run")
            bliss = option(argv, "--scorer") == "bliss"
            (run / "selected").mkdir(parents=True)
            by_source = {
                "austen_novels": {"documents_seen": 10, "documents_kept": 9 if bliss else 3,
                                  "tokens_seen": 1000, "tokens_kept": 900 if bliss else 300},
                "python_docs_rawhtml": {"documents_seen": 40, "documents_kept": 1 if bliss else 12,
                                        "tokens_seen": 2000, "tokens_kept": 0 if bliss else 600},
            }
            manifest = {"documents": {"seen": 50, "kept": 10 if bliss else 15},
                        "tokens": {"seen": 3000, "kept": 900}, "by_source": by_source}
            (run / "selected" / "manifest.json").write_bytes(orjson.dumps(manifest))
        elif stage == "pretrain":
            run = runs / option(argv, "--run")
            bliss = "bliss" in option(argv, "--data")
            batch = int(option(argv, "--global-batch-tokens"))
            steps, every = int(option(argv, "--steps")), int(option(argv, "--eval-every"))
            events = [{"stage": "pretrain", "kind": "start", "global_batch_tokens": batch}]
            for step in range(every, steps + 1, every):
                events.append({"stage": "pretrain", "kind": "eval", "step": step,
                               "loss_val": 9.0 - step / steps * (4.0 if bliss else 2.0)})
            events.append({"stage": "pretrain", "kind": "done"})
            append_events(run, *events)
        elif stage == "eval":
            run = Path(option(argv, "--checkpoint"))
            bliss = "bliss" in run.name
            append_events(run, {"stage": "eval", "kind": "eval", "loss_val": 5.0 if bliss else 7.0,
                                "perplexity": 148.4 if bliss else 1096.6, "bits_per_byte": 1.9 if bliss else 2.6})
        return 0


def one_after_another(runs, log_dir):
    """Stands in for the side-by-side runner: each stage through ``demo.run_blissctl_stage`` (whichever
    fake a test put there), in order."""
    return [StageExit(demo.run_blissctl_stage(argv), 0.0, 0.0) for _, argv in runs]


@pytest.fixture
def fake(monkeypatch):
    stages = FakeStages()
    monkeypatch.setattr(demo, "run_blissctl_stage", stages)
    monkeypatch.setattr(demo, "run_blissctl_stages_beside", one_after_another)
    return stages


def test_demo_runs_the_chain_with_equal_conditions_and_prints_the_comparison(tmp_path, fake):
    result = runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--tokens", "16k", "--eval-points", "4"])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in fake.calls] == ["train-scorer", "select", "select", "pretrain", "pretrain", "eval", "eval"]

    train, bliss_select, random_select, bliss_lm, random_lm = fake.calls[:5]
    assert option(train, "--proxy") == "tiny"
    assert option(bliss_select, "--scorer-run") == "demo-scorer"
    # The control arm tokenises with the scorer's tokenizer, so both models see the same vocabulary.
    assert option(random_select, "--tokenizer") == str(tmp_path / "demo-scorer" / "tokenizer.json")
    assert option(bliss_select, "--budget") == option(random_select, "--budget") == "30%"
    assert option(bliss_select, "--chunks") == "4"
    assert "--exact-token-counts" in bliss_select and "--exact-token-counts" in random_select
    for flag in ("--size", "--steps", "--seq-len", "--global-batch-tokens", "--seed", "--eval-every", "--val"):
        assert option(bliss_lm, flag) == option(random_lm, flag), flag
    assert option(bliss_lm, "--steps") == "8"  # 16k tokens at 2,048 tokens a step
    # The arms run side by side from select on, each on half the cores (BLISS's select, whose scores do not
    # depend on its thread count, on all of them); train-scorer runs alone on all.
    assert option(train, "--threads") == option(bliss_select, "--threads") == pinned_threads()[1]
    for argv in fake.calls[2:]:
        assert option(argv, "--threads") == pinned_threads(SIDE_BY_SIDE)[1], argv

    out = result.output
    assert "BLISS vs random" in out and "austen_novels" in out and "100.0%" in out and "1.00×" in out
    assert "2.00×" in out  # the fake bliss curve reaches random's final loss in half the tokens
    saved = orjson.loads((tmp_path / "demo-comparison.json").read_bytes())
    assert saved["arms"]["bliss"]["speedup_vs_random"] == pytest.approx(2.0)
    assert saved["arms"]["random"]["bits_per_byte"] == 2.6


def test_a_second_run_reuses_every_stage_and_other_settings_need_force(tmp_path, fake):
    args = ["demo", "--runs-dir", str(tmp_path), "--tokens", "16k"]
    assert runner.invoke(app, args).exit_code == 0
    calls = len(fake.calls)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and len(fake.calls) == calls
    assert "already done" in again.output and "BLISS vs random" in again.output

    changed = runner.invoke(app, args + ["--scorer-steps", "5"])
    assert changed.exit_code == 2 and "--force" in changed.output
    forced = runner.invoke(app, args + ["--scorer-steps", "5", "--force"])
    assert forced.exit_code == 0 and len(fake.calls) == 2 * calls
    assert option(fake.calls[calls], "--steps") == "5"


def test_a_failed_stage_is_one_line_and_the_rerun_continues(tmp_path, fake, monkeypatch):
    def broken(argv):
        return 1 if argv[0] == "pretrain" else fake(argv)

    monkeypatch.setattr(demo, "run_blissctl_stage", broken)
    result = runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--tokens", "16k"])
    assert result.exit_code == 2
    assert "stage 4 (pretrain) failed" in result.output and "Traceback" not in result.output

    monkeypatch.setattr(demo, "run_blissctl_stage", fake)
    done_before = len(fake.calls)
    assert runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--tokens", "16k"]).exit_code == 0
    assert [c[0] for c in fake.calls[done_before:]] == ["pretrain", "pretrain", "eval", "eval"]


def test_bad_flags_are_one_line(tmp_path, fake):
    result = runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--tokens", "lots"])
    assert result.exit_code == 2 and "--tokens" in result.output
    result = runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--batch-tokens", "1000"])
    assert result.exit_code == 2 and "--batch-tokens" in result.output
    assert fake.calls == []


@pytest.mark.slow
def test_the_real_demo_runs_end_to_end_with_minimal_settings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "blissctl", "demo", "--runs-dir", str(tmp_path), "--scorer-steps", "1",
         "--scorer-warmup-steps", "2", "--tokens", "8k", "--eval-points", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = orjson.loads((tmp_path / "demo-comparison.json").read_bytes())
    for arm in ("bliss", "random"):
        assert saved["arms"][arm]["val_loss"] > 0 and saved["arms"][arm]["bits_per_byte"] > 0
        assert len(saved["arms"][arm]["curve"]) == 2
    assert "BLISS vs random" in result.stdout


def test_stages_marked_beside_run_through_the_side_by_side_runner_and_a_failure_waits_for_its_neighbour(tmp_path):
    from engine.experiment import Stage, run_stages

    def stage(name: str, beside: bool = False) -> Stage:
        return Stage(title=name, argv=[name], run_dir=tmp_path / name, done=lambda: False, beside_previous=beside)

    alone, together = [], []
    stages = [stage("first"), stage("a"), stage("b", beside=True), stage("last")]

    def beside(runs):
        together.append([argv[0] for _, argv in runs])
        return [StageExit(1 if argv[0] == "a" else 0, 2.0, 1.5) for _, argv in runs]

    with pytest.raises(Exception, match="stage 2 \\(a\\) failed"):
        run_stages(stages, runner=lambda argv: alone.append(argv[0]) or 0, announce=lambda *a: None, beside=beside)
    # "b" ran beside the failed "a" (its work is kept); nothing after the pair started.
    assert alone == ["first"] and together == [["a", "b"]]
    assert stages[2].timing == {"wall_s": 2.0, "cpu_s": 1.5} and stages[3].timing == {}


def test_the_side_by_side_runner_runs_real_commands_and_keeps_each_ones_output_and_status(tmp_path, capsys):
    from blissctl.common import run_blissctl_stages_beside
    from engine.experiment import Stage

    runs = [(Stage(title="help", argv=[], run_dir=tmp_path / "run-a", done=lambda: False), ["select", "--help"]),
            (Stage(title="bad", argv=[], run_dir=tmp_path / "run-b", done=lambda: False),
             ["select", "--input", str(tmp_path / "missing.jsonl"), "--budget", "10%"])]
    exits = run_blissctl_stages_beside(runs, tmp_path / "logs")
    assert [e.code for e in exits] == [0, 2]
    assert all(e.cpu_s > 0 and e.wall_s > 0 for e in exits)
    assert "Example" in (tmp_path / "logs" / "run-a.select.log").read_text()
    bad_log = (tmp_path / "logs" / "run-b.select.log").read_text()
    assert "missing.jsonl" in bad_log and "Traceback" not in bad_log
    # Each log is printed once its stage has ended.
    assert "missing.jsonl" in capsys.readouterr().out
