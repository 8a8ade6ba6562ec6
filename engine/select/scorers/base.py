"""The scorer interface of ``select`` and the ``random`` scorer (the control arm every experiment needs).

A scorer sees batches of documents from one shard and returns one float per document; higher means
keep. Workers tokenise only what a scorer will look at (``max_tokens``), and ship token ids only when
``needs_tokens`` is set. The BLISS score model implements the same interface (``engine.select.scorers.bliss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.select.noise import document_uniforms


@dataclass(frozen=True, slots=True)
class ShardBatch:
    """Documents of one shard, as the worker processes hand them to the scorer."""

    shard_label: str
    lines: np.ndarray
    """uint32 (B,): line numbers, the documents' ids within the shard."""
    n_tokens: np.ndarray
    """uint32 (B,): whole-document token counts (exact, or extrapolated past the tokenised prefix)."""
    token_ids: list[np.ndarray] | None = None
    """B int32 arrays of at most ``max_tokens`` ids each, when the scorer asked for them."""


class Scorer(Protocol):
    name: str
    needs_tokens: bool
    max_tokens: int

    def score(self, batch: ShardBatch) -> np.ndarray:
        """float32 (B,): one score per document, higher is better."""
        ...

    def describe(self) -> dict[str, Any]:
        """What identifies this scorer's output (recorded in the manifest, checked on resume)."""
        ...


class RandomScorer:
    """Uniform scores in (0, 1) from a hash of (seed, shard, line): seeded and order-independent."""

    name = "random"
    needs_tokens = False

    def __init__(self, seed: int, max_tokens: int):
        self.seed = seed
        self.max_tokens = max_tokens

    def score(self, batch: ShardBatch) -> np.ndarray:
        return document_uniforms(self.seed, "random-score", batch.shard_label, batch.lines).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}
