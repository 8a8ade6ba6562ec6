"""``select --scorer random`` over the evaluation pool: end-to-end docs/s, and the main process's peak
RSS as the input grows from 1 to 8 shards at a 30% budget. Goal: RSS growth ≤ 32 bytes a kept document.

Each size runs in a fresh process (peak RSS is a high-water mark). The tokenizer is trained once,
before timing, as a run with --tokenizer would; its training time is reported on its own.

    .venv/bin/python bench/bench_select.py [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import pool_shards, record


def peak_rss_mb() -> float:
    """VmHWM: this process's own high-water mark. (ru_maxrss would include the parent's RSS at fork
    time on Linux, which hides everything smaller than the parent.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def topk_peak_bytes(run_dir, manifest) -> int:
    """Peak bytes the top-k structure itself allocates (numpy reports to tracemalloc), replayed on the
    run's score files exactly as select feeds it."""
    import tracemalloc

    import numpy as np

    from engine.select.score_files import load_shard_scores, score_file
    from engine.select.topk import TopKByWeight, rank_keys

    shards = [load_shard_scores(score_file(run_dir, i["label"])) for i in manifest["inputs"]]
    bases = np.cumsum([0] + [s.n_lines for s in shards])
    tracemalloc.start()
    topk = TopKByWeight(manifest["budget"]["amount"])
    for shard, base in zip(shards, bases, strict=False):
        tracemalloc.reset_peak()  # count the structure, not the score arrays loaded above
        topk.push(rank_keys(shard.scores, shard.lines.astype(np.uint64) + np.uint64(base)), shard.tokens)
    topk.kept()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def child(args) -> None:
    from engine.run_dir import RunDir
    from engine.select.config import SelectConfig
    from engine.select.stage import run_select

    shards = pool_shards()[: args.shards]
    config = SelectConfig(
        inputs=tuple(map(str, shards)), budget="30%", workers=args.workers, tokenizer=args.tokenizer,
        runs_dir=args.runs_dir,
    )
    start = time.perf_counter()
    manifest = run_select(config, RunDir.named(f"bench-{args.shards}", args.runs_dir))
    elapsed = time.perf_counter() - start
    topk_bytes = topk_peak_bytes(RunDir.named(f"bench-{args.shards}", args.runs_dir), manifest)
    print(json.dumps({
        "topk_peak_bytes_per_kept_doc": topk_bytes / manifest["documents"]["kept"],
        "shards": args.shards,
        "elapsed_s": elapsed,
        "docs_seen": manifest["documents"]["seen"],
        "docs_kept": manifest["documents"]["kept"],
        "tokens_seen": manifest["tokens"]["seen"],
        "peak_rss_mb": peak_rss_mb(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--tokenizer")
    parser.add_argument("--runs-dir")
    args = parser.parse_args()
    if args.child:
        return child(args)

    from engine.data.tokenizer import resolve_tokenizer, training_sample

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer.json"
        start = time.perf_counter()
        resolve_tokenizer(None, tokenizer, training_sample(pool_shards()))
        tokenizer_s = time.perf_counter() - start
        rows = []
        for shards in (1, 2, 4, 8):
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--shards", str(shards), "--workers", str(args.workers),
                 "--tokenizer", str(tokenizer), "--runs-dir", str(Path(tmp) / "runs")],
                capture_output=True, text=True, check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    # least-squares slope of peak RSS against kept documents
    xs = [r["docs_kept"] for r in rows]
    ys = [r["peak_rss_mb"] * 2**20 for r in rows]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    full = rows[-1]
    record("select_random", {
        "workers": args.workers,
        "tokenizer_training_s": round(tokenizer_s, 1),
        "whole_pool": {
            "documents": full["docs_seen"],
            "docs_per_s": round(full["docs_seen"] / full["elapsed_s"]),
            "tokens_per_s": round(full["tokens_seen"] / full["elapsed_s"]),
            "elapsed_s": round(full["elapsed_s"], 1),
        },
        "peak_rss_by_shards": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "rss_growth_bytes_per_kept_doc": round(slope, 1),
        "topk_peak_bytes_per_kept_doc_8_shards": round(full["topk_peak_bytes_per_kept_doc"], 1),
        "goal": "rss growth <= 32 bytes per kept document",
    })


if __name__ == "__main__":
    main()
