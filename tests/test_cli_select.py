"""``blissctl select`` as a user runs it: help, one-line errors, Ctrl-C and --resume, torchrun ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blissctl.cli import app
from tests.conftest import make_records, write_shard

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def blissctl(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "blissctl", *args], capture_output=True, text=True, cwd=kwargs.pop("cwd", None), **kwargs)


def read_selection(run_dir: Path) -> dict[str, bytes]:
    import zstandard

    return {
        p.name: zstandard.ZstdDecompressor().stream_reader(p.open("rb")).read()
        for p in sorted((run_dir / "selected").glob("*.jsonl.zst"))
    }


def test_help_lists_every_command_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("select", "train-scorer", "pretrain", "eval", "dashboard"):
        assert command in result.output
    result = runner.invoke(app, ["select", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "--budget" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0%"], "keeps nothing"),
        (["--budget", "150%"], "cannot exceed 100%"),
        (["--budget", "lots"], "not a budget"),
        (["--unit", "pages"], "choose tokens or docs"),
        (["--scorer", "bliss"], "needs --scorer-run"),
        (["--input", "/no/such/file.jsonl"], "input not found"),
        (["--resume", "--force"], "contradict"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
    result = runner.invoke(app, ["select", "--runs-dir", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_default_run_selects_from_the_embedded_sample(tmp_path):
    result = runner.invoke(app, ["select", "--runs-dir", str(tmp_path), "--run", "demo", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "documents" in result.output and "9,600" in result.output
    manifest = (tmp_path / "demo" / "selected" / "manifest.json").read_text()
    assert '"kept"' in manifest
    import orjson

    first = orjson.loads(manifest)
    tokens = first["tokens"]
    assert 0.29 * tokens["seen"] <= tokens["kept"] <= 0.30 * tokens["seen"]  # 30% of the tokens, the default
    assert f"{first['documents']['kept']:,}" in result.output and f"{tokens['kept']:,}" in result.output
    assert first["scorer"] == {"name": "random", "seed": 0}
    again = runner.invoke(app, ["select", "--runs-dir", str(tmp_path), "--run", "demo", "--force", "--budget", "10%"])
    assert again.exit_code == 0, again.output
    second = orjson.loads((tmp_path / "demo" / "selected" / "manifest.json").read_bytes())
    assert second["budget"]["spec"] == "10%" and second["tokens"]["kept"] <= 0.10 * second["tokens"]["seen"]
    assert f"{second['tokens']['kept']:,}" in again.output
    kept = read_selection(tmp_path / "demo")
    assert sum(data.count(b"\n") for data in kept.values()) == second["documents"]["kept"]  # the files hold them all


def test_ctrl_c_then_resume_gives_the_uninterrupted_selection(tmp_path, small_tokenizer):
    # Eight shards: after the first score file appears, seven are left for the signal to land in.
    shards = [write_shard(tmp_path / "pool" / f"part-{i}.jsonl.zst", make_records(3000, seed=i)) for i in range(8)]
    common = ["select", "--input", str(tmp_path / "pool"), "--tokenizer", str(small_tokenizer), "--workers", "1",
              "--temperature", "0.3", "--runs-dir", str(tmp_path / "runs")]
    # SIGINT at its default in the child: a test run started in the background (`make test &`, a CI
    # runner) ignores SIGINT, and an ignored signal is inherited across exec (the child then ran to its end).
    process = subprocess.Popen([sys.executable, "-m", "blissctl", *common, "--run", "cut"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    scores = tmp_path / "runs" / "cut" / "scores"
    deadline = time.time() + 120
    while time.time() < deadline and not (scores.exists() and any(scores.glob("*.npz"))):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert 1 <= len(list(scores.glob("*.npz"))) < len(shards)
    assert not (tmp_path / "runs" / "cut" / "selected" / "manifest.json").exists()

    resumed = blissctl(*common, "--run", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = blissctl(*common, "--run", "straight", "--workers", "2")
    assert straight.returncode == 0, straight.stderr
    assert read_selection(tmp_path / "runs" / "cut") == read_selection(tmp_path / "runs" / "straight")


def test_two_torchrun_ranks_select_what_one_process_selects(tmp_path, corpus, small_tokenizer):
    common = ["select", "--input", str(tmp_path / "pool"), "--tokenizer", str(small_tokenizer), "--workers", "1",
              "--budget", "40%", "--temperature", "0.7", "--runs-dir", str(tmp_path / "runs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "blissctl", *common, "--name", "ranks"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    single = blissctl(*common, "--run", "single")
    assert single.returncode == 0, single.stderr
    two, one = read_selection(tmp_path / "runs" / "ranks"), read_selection(tmp_path / "runs" / "single")
    assert two == one and len(two) == 4
    import orjson

    manifest = orjson.loads((tmp_path / "runs" / "ranks" / "selected" / "manifest.json").read_bytes())
    assert manifest["world_size"] == 2 and manifest["documents"]["seen"] == 1200
