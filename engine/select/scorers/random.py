"""``--scorer random``: the control arm every experiment needs.

Uniform scores in (0, 1) from a hash of (seed, shard, line): seeded, and the same whatever the worker
count, file order or rank layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.select.noise import document_uniforms
from engine.select.scorers.base import DEFAULT_SEQ_LEN, ScorerContext, ShardBatch


class RandomScorer:
    name = "random"
    needs_tokens = False
    text_scorer = None
    tokenizer_path = None

    def __init__(self, seed: int, max_tokens: int):
        self.seed = seed
        self.max_tokens = max_tokens

    def score(self, batch: ShardBatch) -> np.ndarray:
        return document_uniforms(self.seed, "random-score", batch.shard_label, batch.lines).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}


def build(context: ScorerContext) -> RandomScorer:
    return RandomScorer(seed=context.config.seed, max_tokens=context.config.seq_len or DEFAULT_SEQ_LEN)
