"""The embedded sample shipped inside the package: the default input, so the demo runs offline."""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).parent


def sample_pool_glob() -> str:
    """Glob of the 4 embedded pool shards (9,600 C4-style documents of mixed quality)."""
    return str(SAMPLE_DIR / "c4-sample.*.jsonl.zst")


def sample_val_path() -> Path:
    """300 held-out narrative passages: the default validation target."""
    return SAMPLE_DIR / "val-narrative.jsonl.zst"


BOOK_SOURCES = ("austen_novels", "brown_corpus", "moby_dick", "shakespeare_milton_pkg", "t8_shakespeare", "kjv_bible")
"""The ``source`` values of the sample (and of ../shared/corpus) that are books: novels, the Brown
corpus, Shakespeare, the Bible; the narrative target's own kind of text. Reports only: selection never
reads ``source``."""
