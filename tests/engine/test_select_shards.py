"""Independent shard jobs (``select --shard-index I --num-shards N``) and their merge: the subset they
write together is the one a single process writes, whatever the order the jobs run in and however
often one of them is killed and rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from blissctl.cli import app
from engine.errors import UserError
from engine.run_dir import RunDir, RunLock
from engine.select.config import SelectConfig
from engine.select.shards import Share, done_marker
from engine.select.stage import run_select
from tests.conftest import make_records, write_shard

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
COMPARED = ("documents", "tokens", "score_threshold", "first_excluded", "skipped", "by_source", "histogram", "inputs")


def selected_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "selected").glob("*.jsonl.zst"))}


@pytest.fixture
def pool(tmp_path) -> Path:
    """Six small shards (two per share of three), one with bad lines to skip and count."""
    for i in range(6):
        records = make_records(250, seed=10 + i)
        if i == 4:
            records[3:3] = [b"{not json", b'{"no_text": 1}']
        write_shard(tmp_path / "pool" / f"part-{i}.jsonl.zst", records)
    return tmp_path / "pool"


def settings(pool: Path, tmp_path: Path, small_tokenizer: Path, **extra) -> dict:
    return dict(inputs=(str(pool),), tokenizer=str(small_tokenizer), workers=0, budget="35%", temperature=0.4,
                runs_dir=str(tmp_path / "runs"), **extra)


# The killed job: it scores its first shard, says so, and hangs until the test kills it with SIGKILL
# (no clean-up runs: locks must be released by the kernel, half-written files must not count).
KILLED_JOB = """
import sys, time
from engine.run_dir import RunDir
from engine.select.config import SelectConfig
from engine.select.stage import run_select

def hang(label):
    print("scored", label, flush=True)
    time.sleep(120)

config = SelectConfig(inputs=(sys.argv[1],), tokenizer=sys.argv[2], workers=0, budget="35%", temperature=0.4,
                      runs_dir=sys.argv[3], shard_index=0, num_shards=3)
run_select(config, RunDir.named("shares", sys.argv[3]), on_shard_scored=hang)
"""


def test_three_shard_jobs_in_any_order_one_killed_and_rerun_select_what_one_process_selects(
        tmp_path, pool, small_tokenizer):
    runs = tmp_path / "runs"
    single = run_select(SelectConfig(**settings(pool, tmp_path, small_tokenizer)), RunDir.named("single", runs))
    shares = RunDir.named("shares", runs)

    def share(index: int, **extra):
        config = SelectConfig(**settings(pool, tmp_path, small_tokenizer, shard_index=index, num_shards=3, **extra))
        return run_select(config, shares)

    last = share(2)
    assert last.pending == [0, 1] and last.manifest is None and last.marker["shards"] == ["part-2.jsonl.zst",
                                                                                           "part-5.jsonl.zst"]
    # Share 0 dies (kill -9) after its first shard's score file is written.
    job = subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(pool), str(small_tokenizer), str(runs)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert job.stdout.readline().startswith("scored part-0"), job.stderr.read()
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    first_scores = shares.scores / "part-0.jsonl.zst.scores.npz"
    assert first_scores.exists() and not (shares.scores / "part-3.jsonl.zst.scores.npz").exists()
    assert not done_marker(shares, Share(0, 3)).exists()
    scored_at = first_scores.stat().st_mtime_ns

    with pytest.raises(UserError, match=r"3 of 6 input shards have no score file.*share\(s\) 0, 1 of --num-shards 3"):
        run_select(SelectConfig(**settings(pool, tmp_path, small_tokenizer, merge=True)), shares)
    assert share(1).pending == [0]
    rerun = share(0)  # the killed job, run again as it was: the last share, so it merges
    assert rerun.pending == [] and rerun.manifest is not None
    assert first_scores.stat().st_mtime_ns == scored_at  # its finished shard was not scored again

    assert selected_bytes(shares.root) == selected_bytes(runs / "single")
    for key in COMPARED:
        assert rerun.manifest[key] == single[key], key
    assert rerun.manifest["skipped"]["total"] == 2

    # A merge by hand may choose another budget; it equals a single process with that budget.
    again = run_select(SelectConfig(**settings(pool, tmp_path, small_tokenizer, merge=True) | {"budget": "10%"}),
                       shares)
    single_10 = run_select(SelectConfig(**settings(pool, tmp_path, small_tokenizer) | {"budget": "10%"}),
                           RunDir.named("single-10", runs))
    assert selected_bytes(shares.root) == selected_bytes(runs / "single-10")
    assert again["documents"] == single_10["documents"]
    events = [orjson.loads(line) for line in shares.events_path.read_bytes().splitlines()]
    assert sorted(e["share"] for e in events if e["kind"] == "share_done") == [0, 1, 2]


def test_a_second_copy_of_a_running_share_stops_with_one_line(tmp_path, pool, small_tokenizer):
    config = SelectConfig(**settings(pool, tmp_path, small_tokenizer, shard_index=1, num_shards=2))
    run_dir = RunDir.named("copies", tmp_path / "runs")
    with RunLock(run_dir.root / Share(1, 2).lock_name(), "select").acquire():  # the first copy, still scoring
        with pytest.raises(UserError, match="in use by select"):
            run_select(config, run_dir)
    assert not any(run_dir.scores.glob("*.npz"))
    # Another share of the same run is not in the way.
    other = run_select(SelectConfig(**settings(pool, tmp_path, small_tokenizer, shard_index=0, num_shards=2)), run_dir)
    assert other.pending == [1]


def test_shares_of_another_split_are_refused(tmp_path, pool, small_tokenizer):
    run_dir = RunDir.named("split", tmp_path / "runs")
    run_select(SelectConfig(**settings(pool, tmp_path, small_tokenizer, shard_index=0, num_shards=3)), run_dir)
    with pytest.raises(UserError, match="made with --num-shards 3"):
        run_select(SelectConfig(**settings(pool, tmp_path, small_tokenizer, shard_index=0, num_shards=2)), run_dir)
    with pytest.raises(UserError, match="--resume with different settings: seed"):
        run_select(SelectConfig(**settings(pool, tmp_path, small_tokenizer, shard_index=1, num_shards=3, seed=5)),
                   run_dir)


def test_the_cli_runs_a_share_then_the_last_share_merges(tmp_path, pool, small_tokenizer):
    plain = ["select", "--input", str(pool), "--tokenizer", str(small_tokenizer), "--workers", "0",
             "--runs-dir", str(tmp_path / "runs"), "--run", "cli"]
    common = [*plain, "--num-shards", "2"]
    first = runner.invoke(app, [*common, "--shard-index", "1"])
    assert first.exit_code == 0, first.output
    assert "share 1 of 2: 3 input shard(s)" in first.output and "waiting for 1 share(s) (0)" in first.output
    assert not (tmp_path / "runs" / "cli" / "selected").exists()
    second = runner.invoke(app, [*common, "--shard-index", "0"])
    assert second.exit_code == 0, second.output
    manifest = orjson.loads((tmp_path / "runs" / "cli" / "selected" / "manifest.json").read_bytes())
    assert f"{manifest['documents']['kept']:,}" in second.output and manifest["documents"]["seen"] == 1500
    no_merge = runner.invoke(app, [*common, "--shard-index", "0", "--no-merge-when-done"])
    assert no_merge.exit_code == 0 and "run the same command with --merge" in no_merge.output
    # --force (a plain select) discards the shares' markers with the scores: a later split starts afresh.
    shares = tmp_path / "runs" / "cli" / "scores" / "shares"
    assert len(list(shares.glob("*.done.json"))) == 2
    forced = runner.invoke(app, [*plain, "--force"])
    assert forced.exit_code == 0, forced.output
    assert not shares.exists() or not list(shares.glob("*.done.json"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard-index", "1"], "--shard-index and --num-shards go together"),
        (["--shard-index", "3", "--num-shards", "3"], "must be from 0 to 2"),
        (["--shard-index", "0", "--num-shards", "0"], "--num-shards 0: must be at least 1"),
        (["--merge", "--shard-index", "0", "--num-shards", "2"], "leave out --shard-index"),
        (["--force", "--shard-index", "0", "--num-shards", "2"], "--force would discard"),
        (["--engine", "spark"], "choose local or ray"),
        (["--engine", "ray", "--shard-index", "0", "--num-shards", "2"], "schedules the shards itself"),
        (["--engine", "ray", "--ray-actors", "0"], "--ray-actors 0"),
    ],
)
def test_bad_scale_flags_are_one_line_errors(tmp_path, args, message):
    result = runner.invoke(app, ["select", "--runs-dir", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_merge_before_any_scores_says_what_to_run(tmp_path, pool, small_tokenizer):
    started = time.perf_counter()
    result = runner.invoke(app, ["select", "--input", str(pool), "--tokenizer", str(small_tokenizer),
                                 "--runs-dir", str(tmp_path / "runs"), "--merge", "--workers", "0"])
    assert result.exit_code == 2
    assert "6 of 6 input shards have no score file" in result.stderr and "--shard-index I --num-shards N" in result.stderr
    assert time.perf_counter() - started < 30
