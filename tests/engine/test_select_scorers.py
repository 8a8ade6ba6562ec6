"""The scorer registry and the scorers it holds, as ``select`` uses them (``random``, ``bliss`` and
``perplexity`` have their own tests; here: the registry, the model-scorer base and ``dsir``)."""

from __future__ import annotations

import shutil

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from blissctl.cli import app
from engine.data.sample import BOOK_SOURCES, sample_pool_glob, sample_val_path
from engine.data.sources import discover_shards
from engine.errors import UserError
from engine.eval.compare import composition
from engine.run_dir import RunDir
from engine.select.config import SelectConfig
from engine.select.scorers import REGISTRY, scorer_entry
from engine.select.stage import run_select
from tests.conftest import make_records, write_shard

runner = CliRunner()


def test_every_registered_scorer_is_a_cli_choice_with_its_help():
    result = runner.invoke(app, ["select", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for name, entry in REGISTRY.items():
        assert name in result.output and entry.help.split(" (")[0][:30] in " ".join(result.output.split())
    assert {"random", "bliss", "perplexity", "dsir"} <= set(REGISTRY)


def test_an_unknown_scorer_names_the_choices(tmp_path):
    result = runner.invoke(app, ["select", "--runs-dir", str(tmp_path), "--scorer", "magic"])
    assert result.exit_code == 2
    assert "choose one of random, bliss, perplexity, dsir" in result.stderr
    with pytest.raises(UserError, match="--scorer dsir needs --val"):
        SelectConfig(scorer="dsir")
    assert scorer_entry("dsir").needs_val and scorer_entry("bliss").needs_run


def _books_share(manifest: dict) -> float:
    return sum(composition(manifest).get(source, 0.0) for source in BOOK_SOURCES)


@pytest.fixture(scope="module")
def sample_selections(tmp_path_factory, small_tokenizer):
    """DSIR and random on the embedded sample, toward the embedded narrative passages."""
    runs = tmp_path_factory.mktemp("runs")
    common = dict(inputs=tuple(map(str, discover_shards(sample_pool_glob())[:2])), budget="30%", workers=0, tokenizer=str(small_tokenizer),
                  runs_dir=str(runs))
    dsir = run_select(SelectConfig(scorer="dsir", val=str(sample_val_path()), **common), RunDir.named("dsir", runs))
    random = run_select(SelectConfig(scorer="random", **common), RunDir.named("random", runs))
    return runs, dsir, random


def test_dsir_keeps_what_looks_like_the_target(sample_selections):
    _, dsir, random = sample_selections
    assert dsir["scorer"]["name"] == "dsir" and dsir["documents"]["seen"] == 4800
    # The narrative target pulls in the books: far more of them than the random control keeps.
    assert _books_share(dsir) > 2 * _books_share(random)
    assert dsir["tokens"]["kept"] <= dsir["budget"]["amount"]


def test_dsir_scores_follow_its_importance_weights(sample_selections):
    from engine.data.sources import read_documents
    from engine.select.score_files import load_shard_scores
    from engine.select.scorers.dsir import MODEL_FILE, SCALE_FILE
    from engine.select.scorers.dsir_ngrams import DsirModel

    runs, _, _ = sample_selections
    model = DsirModel.load(runs / "dsir" / MODEL_FILE)
    scale = orjson.loads((runs / "dsir" / SCALE_FILE).read_bytes())["scale"]
    shard = discover_shards(sample_pool_glob())[0]
    scores = next(s for s in map(load_shard_scores, sorted((runs / "dsir" / "scores").glob("*.npz")))
                  if s.path == str(shard))
    texts = {doc.line: doc.text for doc in read_documents([shard])}
    log_w = model.log_importance([texts[int(line)] for line in scores.lines])
    eligible = np.isfinite(log_w)
    assert (scores.scores[~eligible] == 0).all()  # what DSIR filters out (under 100 words) scores 0
    expected = (1 / (1 + np.exp(-log_w[eligible] / scale))).astype(np.float32)
    np.testing.assert_allclose(scores.scores[eligible], expected, rtol=1e-6)
    order = np.argsort(log_w[eligible])
    assert (np.diff(scores.scores[eligible][order]) >= 0).all()  # a monotone map: the same ranking


def test_dsir_resume_reuses_its_fitted_model_and_refuses_another_target(sample_selections, small_tokenizer, tmp_path):
    runs, first, _ = sample_selections
    config = SelectConfig(inputs=tuple(map(str, discover_shards(sample_pool_glob())[:2])), budget="30%", workers=0, tokenizer=str(small_tokenizer),
                          runs_dir=str(runs), scorer="dsir", val=str(sample_val_path()), resume=True)
    again = run_select(config, RunDir.named("dsir", runs))
    assert again["documents"]["kept"] == first["documents"]["kept"]
    assert again["scorer"] == first["scorer"]
    other = write_shard(tmp_path / "other.jsonl", make_records(20))
    with pytest.raises(UserError, match="--resume with different settings: val"):
        run_select(SelectConfig(**{**config.__dict__, "val": str(other)}), RunDir.named("dsir", runs))


def test_dsir_from_the_cli_on_the_embedded_sample(tmp_path, small_tokenizer):
    one_shard = str(discover_shards(sample_pool_glob())[0])
    result = runner.invoke(app, ["select", "--input", one_shard, "--scorer", "dsir", "--val", str(sample_val_path()),
                                 "--budget", "10%",
                                 "--tokenizer", str(small_tokenizer), "--workers", "1", "--runs-dir", str(tmp_path),
                                 "--run", "d"])
    assert result.exit_code == 0, result.output
    manifest = orjson.loads((tmp_path / "d" / "selected" / "manifest.json").read_bytes())
    assert manifest["scorer"]["name"] == "dsir" and 0 < manifest["tokens"]["kept"] <= manifest["budget"]["amount"]
    assert "2,400" in result.output


def test_a_dsir_fit_left_by_an_attempt_on_another_target_is_fitted_again(sample_selections, small_tokenizer,
                                                                         tmp_path):
    from engine.select.scorers.dsir import MODEL_FILE, SCALE_FILE

    runs, first, _ = sample_selections
    half = runs / "half-done"  # an attempt that fitted DSIR and stopped before recording its config
    half.mkdir()
    for name in (MODEL_FILE, SCALE_FILE):
        shutil.copy(runs / "dsir" / name, half / name)
    other = write_shard(tmp_path / "other.jsonl", make_records(40))
    manifest = run_select(SelectConfig(inputs=tuple(map(str, discover_shards(sample_pool_glob())[:2])), budget="30%",
                                       workers=0, tokenizer=str(small_tokenizer), runs_dir=str(runs), scorer="dsir",
                                       val=str(other)), RunDir.named("half-done", runs))
    assert manifest["scorer"]["val"] == str(other)
    assert manifest["scorer"]["log_ratio_sha256"] != first["scorer"]["log_ratio_sha256"]
    assert orjson.loads((half / SCALE_FILE).read_bytes())["val"] == str(other)
