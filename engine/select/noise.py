"""Per-document pseudo-randomness that depends only on (seed, shard name, line).

Random scores and Gumbel noise come from a hash of the document id rather than from an RNG stream, so
a subset is the same whatever the worker count, the order files are listed in, how ranks split the
shards, or whether the run was interrupted and resumed.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def stable_hash64(*parts: object) -> int:
    """A 64-bit hash of ``parts`` that is the same in every process and Python version."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised (uint64 arithmetic wraps, as intended)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def document_uniforms(seed: int, purpose: str, shard_label: str, lines: np.ndarray) -> np.ndarray:
    """One uniform in the open interval (0, 1) per line, float64, determined by the document id."""
    base = np.uint64(stable_hash64(seed, purpose, shard_label))
    with np.errstate(over="ignore"):
        bits = splitmix64(splitmix64(lines.astype(np.uint64) ^ base) + base)
    # 53 random bits, shifted off zero so that log() is always finite
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def document_gumbels(seed: int, shard_label: str, lines: np.ndarray) -> np.ndarray:
    """Standard Gumbel noise per document, for Gumbel-top-k."""
    return -np.log(-np.log(document_uniforms(seed, "gumbel", shard_label, lines)))


def selection_values(scores: np.ndarray, lines: np.ndarray, shard_label: str, temperature: float,
                     seed: int) -> np.ndarray:
    """What is ranked: the scores, or with Gumbel-top-k log(score) + τ·Gumbel(seed, document id)."""
    if temperature <= 0:
        return scores
    log_scores = np.log(np.maximum(scores.astype(np.float64), 1e-30))
    return (log_scores + temperature * document_gumbels(seed, shard_label, lines)).astype(np.float32)
