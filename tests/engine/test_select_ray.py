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


@pytest.mark.slow  # 12 s here: torch starts in the actor; make test-slow runs it
def test_ray_scorer_actors_run_a_score_model_as_the_local_engine_does(ray_cluster, tmp_path, corpus):
    """A model scorer (bliss, a tiny untrained score model): token ids travel from the read tasks to
    torch in the actors, and the scores are those of the model in this process."""
    import torch

    from engine.bliss.artifacts import save_score_model
    from engine.bliss.score_model import ScoreModel
    from engine.data.tokenizer import train_bpe_tokenizer
    from engine.models.families import build_causal_lm
    from engine.models.presets import pythia_tiny
    from engine.run_dir import atomic_write_bytes

    scorer = RunDir.named("scorer", tmp_path / "runs")
    scorer.create()
    tokenizer = train_bpe_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], 512)
    atomic_write_bytes(scorer.tokenizer_path, tokenizer.to_str().encode())
    model = ScoreModel.from_proxy(build_causal_lm(pythia_tiny(), tokenizer.get_vocab_size(), seed=0))
    with torch.no_grad():
        model.head.weight.normal_(std=1.0)  # spread the scores: an untrained head gives them all ~0.5
    save_score_model(scorer.checkpoints / "score-model.pt", model, preset="tiny",
                     vocab_size=tokenizer.get_vocab_size(), seq_len=16, pad_id=1)
    runs = tmp_path / "runs"
    common = dict(inputs=(str(tmp_path / "pool"),), workers=0, budget="25%", runs_dir=str(runs), scorer="bliss",
                  scorer_run="scorer", threads=1)
    local = run_select(SelectConfig(**common), RunDir.named("local", runs))
    remote = run_select(SelectConfig(**common, engine="ray"), RunDir.named("ray", runs))
    assert selected_bytes(RunDir.named("ray", runs)) == selected_bytes(RunDir.named("local", runs))
    assert remote["documents"] == local["documents"] and remote["scorer"] == local["scorer"]
    for path in sorted((runs / "local" / "scores").glob("*.npz")):
        np.testing.assert_allclose(load_shard_scores(runs / "ray" / "scores" / path.name).scores,
                                   load_shard_scores(path).scores, rtol=0, atol=1e-6)


def test_a_missing_ray_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    result = runner.invoke(app, ["select", "--runs-dir", str(tmp_path), "--engine", "ray"])
    assert result.exit_code == 2
    assert "--engine ray needs Ray Data" in result.stderr and "blissctl[scale]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "random-30pct" / "tokenizer.json").exists()  # said before any work
