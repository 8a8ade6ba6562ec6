"""The perplexity-filter baseline keeps what the warmed-up proxy predicts best, through select's own top-k."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from engine.bliss.artifacts import find_proxy_warmup, save_proxy_warmup
from engine.errors import UserError
from engine.select.scorers.base import ShardBatch
from engine.select.scorers.perplexity import PerplexityScorer
from tests.conftest import make_records, write_shard

FAMILIAR = "The cat sat on the mat and the dog sat on the log. " * 6


@pytest.fixture
def scorer_run(tmp_path, small_tokenizer):
    """A train-scorer-like run whose warm-up checkpoint has learned FAMILIAR by heart."""
    from engine.bliss.bilevel import lm_logits, sequence_losses
    from engine.data.tokenizer import load_tokenizer
    from engine.models.families import build_causal_lm
    from engine.models.presets import model_preset

    run = tmp_path / "runs" / "scorer"
    (run / "checkpoints").mkdir(parents=True)
    (run / "tokenizer.json").write_bytes(small_tokenizer.read_bytes())
    tokenizer = load_tokenizer(small_tokenizer)
    ids = torch.tensor([tokenizer.encode(FAMILIAR).ids[:64]])
    mask = torch.ones_like(ids)
    vocab = tokenizer.get_vocab_size()
    model = build_causal_lm(model_preset("tiny"), vocab, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = sequence_losses(lm_logits(model, ids, mask), ids, mask).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_proxy_warmup(run / "checkpoints" / "proxy-warmup.pt", model, preset="tiny", vocab_size=vocab, seq_len=64,
                      warmup_steps=30)
    return run


def test_scores_are_inverse_perplexity_and_familiar_text_wins(scorer_run):
    scorer = PerplexityScorer.load("scorer", scorer_run.parent, batch_size=2)
    from engine.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(scorer.tokenizer_path)
    salad = " ".join(r["text"] for r in make_records(3, seed=5))
    docs = [np.array(tokenizer.encode(t).ids, np.int32) for t in (salad, FAMILIAR, "x", FAMILIAR[:40])]
    docs[2] = docs[2][:1]  # a one-token document has no next-token loss
    batch = ShardBatch("s", np.arange(4, dtype=np.uint32), np.array([len(d) for d in docs], np.uint32), docs)
    scores = scorer.score(batch)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert scores[1] > scores[0]  # lower perplexity, higher score
    assert scores[2] == 0.0
    nll = scorer.mean_nll([np.asarray(docs[1][: scorer.seq_len], np.int64)])[0]
    assert scores[1] == pytest.approx(np.exp(-nll), rel=1e-5)
    # Batching (sorting by length, padding) does not change a document's score.
    alone = scorer.score(ShardBatch("s", np.arange(1, dtype=np.uint32), batch.n_tokens[:1], docs[:1]))
    assert alone[0] == pytest.approx(scores[0], rel=1e-4)
    assert scorer.describe()["name"] == "perplexity" and len(scorer.describe()["checkpoint_sha256"]) == 64
    threads = torch.get_num_threads()
    try:  # sub-batches on two threads: every document keeps its own score
        scorer.use_threads(2)
        np.testing.assert_allclose(scorer.score(batch), scores, rtol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_select_keeps_the_lowest_perplexity_documents(scorer_run, tmp_path):
    from engine.run_dir import RunDir
    from engine.select.config import SelectConfig
    from engine.select.stage import run_select

    salad = make_records(20, seed=7)
    records = [{"text": FAMILIAR, "source": "familiar"} if i % 2 else {**salad[i], "source": "salad"}
               for i in range(20)]
    shard = write_shard(tmp_path / "pool" / "c4-train.00000-of-00001.jsonl", records)
    config = SelectConfig(inputs=(str(shard),), budget="50%", unit="docs", workers=0, seq_len=64,
                                 scorer="perplexity", scorer_run=str(scorer_run), batch_size=8,
                                 runs_dir=str(tmp_path / "runs"))
    manifest = run_select(config, RunDir(tmp_path / "runs" / "ppl"))
    assert manifest["scorer"]["name"] == "perplexity"
    assert manifest["by_source"]["familiar"]["documents_kept"] == 10
    assert manifest["by_source"]["salad"]["documents_kept"] == 0
    assert orjson.loads((tmp_path / "runs" / "ppl" / "selected" / "manifest.json").read_bytes())["documents"]["kept"] == 10


def test_a_run_without_a_warm_up_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="train-scorer"):
        find_proxy_warmup("nope", tmp_path)
