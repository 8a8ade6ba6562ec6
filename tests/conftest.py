"""Shared fixtures: small corpora written in every supported format, and a tokenizer trained once."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import orjson
import pytest
import zstandard

SHARED = Path(__file__).resolve().parents[2] / "shared"
PYTHIA_TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
POOL_DIR = SHARED / "corpus" / "pool"

WORDS = (
    "the of and to in is was he for it with as his on be at by had not are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_records(n: int, seed: int = 0, sources: tuple[str, ...] = ("web", "books")) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        text = " ".join(sentence(rng, rng.randint(4, 20)) for _ in range(rng.randint(1, 12)))
        record = {"text": text, "timestamp": f"2019-04-{1 + i % 28:02d}T00:00:00Z", "url": f"https://example.org/{seed}/{i}"}
        if sources:
            record["source"] = sources[i % len(sources)]
        records.append(record)
    return records


def encode_lines(records: list) -> list[bytes]:
    return [r if isinstance(r, bytes) else orjson.dumps(r) for r in records]


def write_shard(path: Path, records: list, *, frames: int = 1) -> Path:
    """Write ``records`` (dicts, or raw bytes lines) as .jsonl, .jsonl.zst or .json.gz by ``path``'s name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(line + b"\n" for line in encode_lines(records))
    if path.name.endswith(".zst"):
        step = max(1, len(data) // frames + 1)
        blob = b"".join(zstandard.ZstdCompressor().compress(data[i : i + step]) for i in range(0, len(data), step))
        path.write_bytes(blob)
    elif path.name.endswith(".gz"):
        step = max(1, len(data) // frames + 1)
        path.write_bytes(b"".join(gzip.compress(data[i : i + step]) for i in range(0, len(data), step)))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 1,024-token BPE trained once on synthetic text (training the default 8k one takes seconds)."""
    from engine.data.tokenizer import train_bpe_tokenizer

    texts = [r["text"] for r in make_records(400, seed=99)]
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_text(train_bpe_tokenizer(texts, vocab_size=1024).to_str())
    return path


@pytest.fixture
def corpus(tmp_path) -> list[Path]:
    """Four shards of 300 documents, in three formats (two in zstd, with several frames)."""
    return [
        write_shard(tmp_path / "pool" / "c4-train.00000-of-00004.json.gz", make_records(300, seed=1), frames=3),
        write_shard(tmp_path / "pool" / "c4-train.00001-of-00004.jsonl.zst", make_records(300, seed=2), frames=2),
        write_shard(tmp_path / "pool" / "c4-train.00002-of-00004.jsonl", make_records(300, seed=3)),
        write_shard(tmp_path / "pool" / "c4-train.00003-of-00004.jsonl.zst", make_records(300, seed=4)),
    ]
