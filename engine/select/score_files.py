"""Score files: one per input shard in ``runs/<name>/scores/``, the resume point of ``select``.

Each holds every parsed document's line, score, token count and source code (14 bytes a document) and
what produced them (the scorer's ``describe()``), so a resume reuses exactly the shards scored the same
way, and the exact top-k reads them back one shard at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.run_dir import RunDir, atomic_write_with


@dataclass
class ShardScores:
    """One shard's score file: every parsed document's line, score, token count and source."""

    label: str
    path: str
    n_lines: int
    lines: np.ndarray  # uint32
    scores: np.ndarray  # float32
    tokens: np.ndarray  # uint32
    source_codes: np.ndarray  # uint16
    source_names: list[str]
    skips: dict[str, int]
    text_bytes: int
    n_estimated: int
    scorer: dict[str, Any] = field(default_factory=dict)

    @property
    def docs(self) -> int:
        return int(self.lines.size)

    @property
    def token_total(self) -> int:
        return int(self.tokens.sum(dtype=np.uint64))


def score_file(run_dir: RunDir, label: str) -> Path:
    return run_dir.scores / (label.replace("/", "__") + ".scores.npz")


def save_shard_scores(path: Path, shard: ShardScores) -> None:
    meta = {k: v for k, v in asdict(shard).items() if k not in ("lines", "scores", "tokens", "source_codes")}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f, lines=shard.lines, scores=shard.scores, tokens=shard.tokens, source_codes=shard.source_codes,
                meta=np.frombuffer(orjson.dumps(meta), np.uint8),
            )

    atomic_write_with(path, write)


def load_shard_scores(path: Path) -> ShardScores | None:
    """A score file, or None when it is missing or unreadable (the shard is then scored again)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            meta = orjson.loads(data["meta"].tobytes())
            return ShardScores(
                lines=data["lines"], scores=data["scores"], tokens=data["tokens"],
                source_codes=data["source_codes"], **meta,
            )
    except Exception:  # a damaged file is not fatal: it is only a cache of work that can be redone
        return None
