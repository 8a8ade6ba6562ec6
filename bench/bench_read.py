"""Read path: decompress + split + parse (what ``select`` does per document before tokenising) against
plain zstd decompression of the same files, in one run. Goal: ratio ≥ 0.5.

    .venv/bin/python bench/bench_read.py
"""

from __future__ import annotations

import time

import zstandard
from _common import pool_shards, record

from engine.data.sources import ReadTally, SkipCounts, iter_text_records


def plain_decompress(path) -> int:
    total = 0
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        while chunk := reader.read(1 << 20):
            total += len(chunk)
    return total


def decompress_and_parse(path) -> tuple[int, int]:
    """The reader of select's workers: every document's line number, text and source."""
    tally = ReadTally()
    docs = sum(1 for _ in iter_text_records(path, SkipCounts(), tally))
    return tally.line_bytes, docs


def main() -> None:
    shards = pool_shards()
    plain_s = parse_s = 0.0
    plain_bytes = parse_bytes = docs = 0
    for _ in range(2):  # interleaved, twice, so both see the same machine load
        for path in shards:
            start = time.perf_counter()
            plain_bytes += plain_decompress(path)
            plain_s += time.perf_counter() - start
            start = time.perf_counter()
            n_bytes, n_docs = decompress_and_parse(path)
            parse_s += time.perf_counter() - start
            parse_bytes += n_bytes
            docs += n_docs
    plain_mb_s = plain_bytes / plain_s / 1e6
    parse_mb_s = parse_bytes / parse_s / 1e6
    record("read_path", {
        "shards": len(shards),
        "decompressed_mb": round(plain_bytes / 2 / 1e6, 1),
        "documents": docs // 2,
        "plain_zstd_mb_per_s": round(plain_mb_s, 1),
        "decompress_parse_mb_per_s": round(parse_mb_s, 1),
        "decompress_parse_docs_per_s": round(docs / parse_s),
        "ratio": round(parse_mb_s / plain_mb_s, 3),
        "goal": "ratio >= 0.5",
    })


if __name__ == "__main__":
    main()
