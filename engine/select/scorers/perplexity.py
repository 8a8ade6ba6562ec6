"""The perplexity-filter baseline: keep the documents the warmed-up proxy finds least surprising.

A common heuristic of the data-selection literature (e.g. CCNet-style filtering, "perplexed by
perplexity"), and the obvious question to ask of BLISS: does the bilevel score model learn anything
beyond "the proxy already predicts this text well"? The scorer loads the proxy that ``train-scorer``
saved after its warm-up on random data (``checkpoints/proxy-warmup.pt``), with the run's tokenizer, and
scores each document by exp(−mean next-token NLL) of its first ``seq_len`` tokens: 1/perplexity, in
(0, 1], so that ``select``'s top-k under the budget keeps the lowest-perplexity documents and its score
histogram stays readable. It satisfies ``engine.select.scorers.base.Scorer``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.bliss.artifacts import artifact_tokenizer, find_proxy_warmup, load_proxy_warmup
from engine.data.collate import collate
from engine.select.scorers.base import ModelScorer, ScorerContext, ShardBatch


class PerplexityScorer(ModelScorer):
    """Scores documents by 1/perplexity under a warmed-up proxy LM (higher = more predictable)."""

    name = "perplexity"

    @classmethod
    def load(cls, source: str | Path, runs_dir: Path | str = "runs", *, seq_len: int | None = None,
             batch_size: int = 64, device: str = "cpu") -> PerplexityScorer:
        cls.check_options(device=device, seq_len=seq_len, batch_size=batch_size)
        checkpoint = find_proxy_warmup(source, runs_dir)
        model, meta = load_proxy_warmup(checkpoint, seq_len=seq_len)
        tokenizer_path = artifact_tokenizer(checkpoint)
        return cls(model.to(device), checkpoint=checkpoint.resolve(), tokenizer_path=tokenizer_path.resolve(),
                   device=device, seq_len=seq_len or int(meta["seq_len"]), batch_size=batch_size,
                   pad_id=cls.padding_id(tokenizer_path))

    def mean_nll(self, pieces: list[np.ndarray]) -> np.ndarray:
        """float64 (N,): mean next-token NLL of each token sequence; NaN for one with fewer than 2 tokens."""
        from engine.bliss.bilevel import lm_logits, sequence_losses

        @torch.inference_mode()
        def score_group(idx: np.ndarray) -> np.ndarray:
            ids_t, mask_t = collate([pieces[i] for i in idx], self.pad_id, self.device)
            with self.autocast():
                return sequence_losses(lm_logits(self.model, ids_t, mask_t), ids_t, mask_t).double().cpu().numpy()

        out = np.full(len(pieces), np.nan)
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        order = np.argsort(lengths, kind="stable")  # similar lengths share a batch
        order = order[lengths[order] >= 2]
        groups = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        for idx, losses in zip(groups, self.map_sub_batches(score_group, groups), strict=True):
            out[idx] = losses
        return out

    def score(self, batch: ShardBatch) -> np.ndarray:
        """float32 (B,): exp(−mean NLL) of each document's first ``seq_len`` tokens; 0 when it has < 2 tokens."""
        if batch.token_ids is None:
            raise ValueError("the perplexity scorer needs token ids (needs_tokens=True)")
        pieces = [np.asarray(t, dtype=np.int64)[: self.seq_len] for t in batch.token_ids]
        nll = self.mean_nll(pieces)
        return np.where(np.isnan(nll), 0.0, np.exp(-np.nan_to_num(nll, nan=0.0))).astype(np.float32)


def build(context: ScorerContext) -> PerplexityScorer:
    config = context.config
    return PerplexityScorer.load(config.scorer_run, Path(config.runs_dir), seq_len=config.seq_len,
                                 batch_size=config.batch_size, device=config.device)
