"""Streams of tokenised documents for training the proxy and the score model (``train-scorer``).

``DocumentStream`` is the endless, shuffled, resumable stream of training documents;
``tokenised_documents`` the first documents of a set (validation and probe documents). Each document
is its first ``seq_len`` tokens (``engine.data.tokenizer.prefix_encoder``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from engine.data.sources import SkipCounts, read_documents
from engine.errors import UserError


class DocumentStream:
    """Endless stream of training documents (first ``seq_len`` tokens, at least 2), shuffled and resumable.

    Each epoch visits the shards in a seeded order; each shard is read in chunks of ``buffer`` documents,
    each chunk permuted by an RNG seeded with (seed, epoch, shard, chunk). A position (epoch, shard slot,
    documents consumed in that shard) therefore determines everything that follows, so a resume re-reads
    at most one shard and tokenises at most one chunk before it is back where it stopped.
    """

    def __init__(self, shards: Sequence[Path], encode: Callable[[list[str]], list[np.ndarray]], *,
                 seed: int, buffer: int, position: dict[str, int] | None = None):
        self.shards = list(shards)
        self.encode = encode
        self.seed = seed
        self.buffer = buffer
        position = position or {"epoch": 0, "shard": 0, "offset": 0}
        self.position = dict(position)
        self.skips = SkipCounts()
        self.too_short = 0
        self._docs = self._generate(position["epoch"], position["shard"], position["offset"])

    def _generate(self, epoch: int, shard_slot: int, offset: int) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
        while True:
            yielded = 0
            started_at_beginning = shard_slot == 0 and offset == 0
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            for slot in range(shard_slot, len(order)):
                shard_index = int(order[slot])
                chunk: list[str] = []
                chunk_index = 0
                docs = read_documents([self.shards[shard_index]], self.skips)
                while True:
                    doc = next(docs, None)
                    if doc is not None:
                        chunk.append(doc.text)
                        if len(chunk) < self.buffer:
                            continue
                    if chunk:
                        start = chunk_index * self.buffer
                        if start + len(chunk) > offset:
                            perm = np.random.default_rng([self.seed, epoch, shard_index, chunk_index]).permutation(
                                len(chunk))
                            first = max(offset - start, 0)
                            texts = [chunk[i] for i in perm[first:]]
                            for j, tokens in enumerate(self.encode(texts)):
                                where = {"epoch": epoch, "shard": slot, "offset": start + first + j + 1}
                                if len(tokens) >= 2:
                                    yielded += 1
                                    yield tokens, where
                                else:
                                    self.too_short += 1
                        chunk = []
                        chunk_index += 1
                    if doc is None:
                        break
                offset = 0
            if yielded == 0 and started_at_beginning:  # a whole epoch without one usable document
                raise UserError("no training document has 2 or more tokens; check --train")
            epoch, shard_slot = epoch + 1, 0

    def next_batch(self, n: int) -> list[np.ndarray]:
        """The next ``n`` documents' token ids (int32 arrays); advances the position."""
        batch = []
        for _ in range(n):
            tokens, where = next(self._docs)
            batch.append(tokens)
            self.position = where
        return batch


def tokenised_documents(paths: Sequence[Path], encode, limit: int, skips: SkipCounts | None = None) -> list[np.ndarray]:
    """The first ``limit`` documents of ``paths`` with at least 2 tokens, in reading order."""
    out: list[np.ndarray] = []
    texts: list[str] = []
    for doc in read_documents(paths, skips):
        texts.append(doc.text)
        if len(texts) >= 256:
            out.extend(t for t in encode(texts) if len(t) >= 2)
            texts = []
            if len(out) >= limit:
                break
    out.extend(t for t in encode(texts) if len(t) >= 2)
    return out[:limit]
