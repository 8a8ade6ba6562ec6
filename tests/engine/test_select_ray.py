"""``select --engine ray`` on a local 2-CPU Ray cluster: the same score files and the same subset as the
local engine, a resume that mixes both engines, and one line when Ray is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from blissctl.cli import app
from engine.data.sample import sample_val_path
from engine.run_dir import RunDir
from engine.select.config import SelectConfig
from engine.select.score_files import load_shard_scores
from engine.select.stage import run_select

runner = CliRunner()
COMPARED = ("documents", "tokens", "score_threshold", "first_excluded", "skipped", "by_source", "histogram", "inputs")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module (starting Ray takes seconds); the engine uses it as it finds it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def selected_bytes(run_dir: RunDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.selected.glob("*.jsonl.zst"))}


def test_ray_engine_selects_what_the_local_engine_selects(ray_cluster, tmp_path, corpus, small_tokenizer):
    """DSIR (its n-grams run in the read tasks, the weights in the actor), then a run that the local
    engine starts and the Ray engine resumes."""
    runs = tmp_path / "runs"
    common = dict(inputs=(str(tmp_path / "pool"),), tokenizer=str(small_tokenizer), workers=0, budget="40%",
                  temperature=0.3, runs_dir=str(runs), scorer="dsir", val=str(sample_val_path()))
    local = run_select(SelectConfig(**common), RunDir.named("local", runs))
    ray_run = RunDir.named("ray", runs)
    remote = run_select(SelectConfig(**common, engine="ray", ray_actors=2), ray_run)
    assert selected_bytes(ray_run) == selected_bytes(RunDir.named("local", runs))
    for key in COMPARED:
        assert remote[key] == local[key], key
    for path in sorted((runs / "local" / "scores").glob("*.npz")):  # the score files themselves
        mine, theirs = load_shard_scores(path), load_shard_scores(ray_run.scores / path.name)
        assert np.array_equal(mine.lines, theirs.lines) and np.array_equal(mine.scores, theirs.scores)
        assert np.array_equal(mine.tokens, theirs.tokens) and mine.skips == theirs.skips

    # Interrupted after one shard by the local engine, resumed by Ray: the same subset again.
    mixed = RunDir.named("mixed", runs)

    def stop(label):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_select(SelectConfig(**common), mixed, on_shard_scored=stop)
    assert len(list(mixed.scores.glob("*.npz"))) == 1
    resumed = run_select(SelectConfig(**common, engine="ray", resume=True), mixed)
    assert selected_bytes(mixed) == selected_bytes(RunDir.named("local", runs))
    assert resumed["documents"] == local["documents"]


def test_a_missing_ray_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    result = runner.invoke(app, ["select", "--runs-dir", str(tmp_path), "--engine", "ray"])
    assert result.exit_code == 2
    assert "--engine ray needs Ray Data" in result.stderr and "blissctl[scale]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "random-30pct" / "tokenizer.json").exists()  # said before any work
