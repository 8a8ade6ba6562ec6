"""The score model (backbone + masked mean-pool + Linear + sigmoid) and the ``bliss`` scorer of ``select``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.bliss.artifacts import load_score_model, save_score_model
from engine.bliss.score_model import ScoreModel
from engine.data.tokenizer import train_bpe_tokenizer
from engine.errors import UserError
from engine.models.families import build_causal_lm
from engine.models.presets import pythia_tiny
from engine.run_dir import RunDir, atomic_write_bytes
from engine.select.scorers.base import ShardBatch
from engine.select.scorers.bliss import BlissScorer, chunk_document

VOCAB = 512


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(2, 250, (len(lengths), T), generator=g)  # inside even a tiny BPE vocabulary
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 1), mask


def test_from_proxy_copies_the_backbone_and_owns_it():
    proxy = build_causal_lm(pythia_tiny(), VOCAB, seed=0)
    model = ScoreModel.from_proxy(proxy)
    assert torch.equal(model.backbone.embed_in.weight, proxy.gpt_neox.embed_in.weight)
    with torch.no_grad():
        model.backbone.embed_in.weight.add_(1.0)
    assert not torch.equal(model.backbone.embed_in.weight, proxy.gpt_neox.embed_in.weight)
    assert not hasattr(model.backbone, "embed_out")  # no LM head


def test_scores_are_probabilities_and_ignore_padding():
    model = ScoreModel.from_proxy(build_causal_lm(pythia_tiny(), VOCAB, seed=0)).eval()
    lengths = [9, 3, 6]
    ids, mask = _batch(lengths)
    with torch.no_grad():
        scores = model(ids, mask)
        assert scores.shape == (3,) and bool(((scores > 0) & (scores < 1)).all())
        for i, n in enumerate(lengths):
            alone = model(ids[i : i + 1, :n], mask[i : i + 1, :n])
            assert torch.allclose(alone[0], scores[i], atol=1e-6)


def _make_scorer_run(tmp_path, seq_len: int = 16) -> tuple[RunDir, ScoreModel]:
    run = RunDir.named("scorer", tmp_path / "runs")
    run.create()
    tokenizer = train_bpe_tokenizer(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], VOCAB)
    atomic_write_bytes(run.tokenizer_path, tokenizer.to_str().encode())
    model = ScoreModel.from_proxy(build_causal_lm(pythia_tiny(), tokenizer.get_vocab_size(), seed=0))
    with torch.no_grad():
        model.head.weight.normal_(std=1.0)  # spread the scores so that chunk means are visible
    save_score_model(run.checkpoints / "score-model.pt", model, preset="tiny",
                     vocab_size=tokenizer.get_vocab_size(), seq_len=seq_len, pad_id=1, extra={"outer_step": 7})
    return run, model.eval()


def test_save_and_load_round_trip(tmp_path):
    run, model = _make_scorer_run(tmp_path)
    loaded, meta = load_score_model(run.checkpoints / "score-model.pt")
    ids, mask = _batch([5, 8])
    with torch.no_grad():
        assert torch.allclose(loaded(ids, mask), model(ids, mask), atol=1e-6)
    assert meta["preset"] == "tiny" and meta["seq_len"] == 16 and meta["outer_step"] == 7


def test_a_foreign_file_is_a_user_error(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(UserError, match="not a blissctl score model"):
        load_score_model(bad)
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_score_model(bad)


def test_bliss_scorer_loads_by_run_name_or_path(tmp_path):
    run, _ = _make_scorer_run(tmp_path)
    by_name = BlissScorer.load("scorer", tmp_path / "runs")
    by_path = BlissScorer.load(str(run.checkpoints / "score-model.pt"), tmp_path / "elsewhere")
    assert by_name.checkpoint == by_path.checkpoint
    assert by_name.tokenizer_path == run.tokenizer_path.resolve()
    assert by_name.max_tokens == 16 and by_name.needs_tokens
    described = by_name.describe()
    assert described["name"] == "bliss" and described["seq_len"] == 16 and described["chunks"] == 1
    assert len(described["checkpoint_sha256"]) == 64


def test_bliss_scorer_missing_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such run"):
        BlissScorer.load("nope", tmp_path)
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(UserError, match="no score model yet"):
        BlissScorer.load("empty-run", tmp_path)
    _make_scorer_run(tmp_path)
    with pytest.raises(UserError, match="--chunks"):
        BlissScorer.load("scorer", tmp_path / "runs", chunks=0)


def _shard_batch(token_ids: list[np.ndarray]) -> ShardBatch:
    n = len(token_ids)
    return ShardBatch(shard_label="s0", lines=np.arange(n, dtype=np.uint32),
                      n_tokens=np.array([len(t) for t in token_ids], dtype=np.uint32), token_ids=token_ids)


def test_bliss_scorer_matches_the_model_on_each_document(tmp_path):
    _, model = _make_scorer_run(tmp_path)
    scorer = BlissScorer.load("scorer", tmp_path / "runs", batch_size=2)  # sub-batches of 2
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 250, n).astype(np.int32) for n in (16, 3, 11, 16, 1)] + [np.zeros(0, np.int32)]
    scores = scorer.score(_shard_batch(docs))
    assert scores.dtype == np.float32 and scores.shape == (6,)
    with torch.no_grad():
        for doc, score in zip(docs[:-1], scores[:-1], strict=True):
            ids = torch.from_numpy(doc.astype(np.int64))[None]
            assert abs(float(model(ids, torch.ones_like(ids))[0]) - score) < 1e-5
    assert 0 < scores[-1] < 1  # an empty document still gets a score (of one padding token)


def test_sub_batches_on_two_threads_give_each_document_its_own_score(tmp_path):
    _make_scorer_run(tmp_path)
    scorer = BlissScorer.load("scorer", tmp_path / "runs", batch_size=2)
    rng = np.random.default_rng(3)
    docs = [rng.integers(2, 250, n).astype(np.int32) for n in rng.integers(1, 17, 40)]
    one_at_a_time = scorer.score(_shard_batch(docs))
    threads = torch.get_num_threads()
    try:
        scorer.use_threads(2)
        assert scorer.parallel_batches == 2 and torch.get_num_threads() == 1
        at_once = scorer.score(_shard_batch(docs))
    finally:
        torch.set_num_threads(threads)
    assert scorer._pool is not None  # the sub-batches did go to the threads
    np.testing.assert_allclose(at_once, one_at_a_time, rtol=0, atol=1e-6)  # each document its own score


def test_chunk_mode_averages_chunk_scores(tmp_path):
    _make_scorer_run(tmp_path, seq_len=8)
    scorer = BlissScorer.load("scorer", tmp_path / "runs", chunks=3)
    assert scorer.max_tokens == 24
    doc = np.random.default_rng(1).integers(2, 250, 30).astype(np.int32)  # 3 full chunks; the rest is cut
    (score,) = scorer.score(_shard_batch([doc]))
    parts = scorer.score_pieces([doc[0:8], doc[8:16], doc[16:24]])
    assert abs(score - parts.mean()) < 1e-6
    assert len({round(float(p), 6) for p in parts}) > 1  # the chunks do differ


def test_chunk_document_drops_a_short_tail_only():
    tokens = np.arange(20)
    assert [len(p) for p in chunk_document(tokens, 8, 4)] == [8, 8, 4]
    assert [len(p) for p in chunk_document(tokens[:17], 8, 4)] == [8, 8]  # 1 token < 25% of 8
    assert [len(p) for p in chunk_document(tokens[:1], 8, 4)] == [1]
    assert [len(p) for p in chunk_document(tokens[:0], 8, 4)] == [0]


def test_sub_batches_cover_every_piece_once_and_keep_lengths_close(tmp_path):
    _make_scorer_run(tmp_path)
    scorer = BlissScorer.load("scorer", tmp_path / "runs", batch_size=16)
    lengths = list(np.random.default_rng(0).integers(0, 257, 200))
    groups = scorer.sub_batches(lengths)
    assert sorted(int(i) for g in groups for i in g) == list(range(200))
    assert all(len(g) <= 16 for g in groups)
    for g in groups:  # a group spreads over at most 1.5× its shortest length, unless it is small
        ls = [lengths[i] for i in g]
        assert len(g) <= 8 or max(ls) <= 1.5 * max(min(ls), 1)
