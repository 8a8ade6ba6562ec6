"""DSIR baseline for bench/quality.py: hashed n-gram importance resampling (PyPI ``data-selection``).

Run as its authors document it (github.com/p-lambda/dsir, README "Quickstart"):

    dsir = HashedNgramDSIR(raw_datasets, target_datasets, cache_dir)
    dsir.fit_importance_estimator(num_tokens_to_fit='auto')
    dsir.compute_importance_weights()
    dsir.resample(out_dir, num_to_sample=..., cache_dir=...)

with the raw pool's shards as ``raw_datasets`` and the validation target as ``target_datasets``, the
package's defaults otherwise (unigrams + bigrams hashed into 10,000 buckets, WordPunct tokenisation,
documents under 100 words filtered out, Gumbel-top-k sampling without replacement). The zstd shards are
read by a ``raw_load_dataset_fn`` that also tags each example with its shard and line, so that the
resampled examples can be traced back to the pool.

DSIR counts documents, the other arms count tokens. ``resample`` draws its Gumbel noise from numpy's
global generator, so with ``np.random.seed(seed)`` before the call the chosen set for ``k`` documents is
the top-``k`` of (log-weight + that noise), nested in ``k``. We draw the same noise once to find the
largest ``k`` whose documents fit the token budget, then let ``resample`` itself choose them, and check
that it chose exactly those. The subset is then written in ``select``'s layout (kept lines copied byte
for byte, ``selected/manifest.json`` with ``by_source``), so ``pretrain`` takes it like any other.

Usage (after a ``select --scorer random`` run on the same pool, whose score files give token counts):
    python bench/dsir_baseline.py --pool ../shared/corpus/pool --target VAL --counts-run runs/quality/random \\
        --run runs/quality/dsir --budget 0.3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.data.formats import output_name  # noqa: E402
from engine.data.sources import discover_shards, iter_raw_lines  # noqa: E402
from engine.run_dir import RunDir, atomic_write_json  # noqa: E402
from engine.select.manifest import ManifestBuilder, SelectionFacts, ShardSummary  # noqa: E402
from engine.select.score_files import load_shard_scores  # noqa: E402
from engine.select.writer import WriteJob, write_selected_shards  # noqa: E402

SHARD_KEY, LINE_KEY = "_bench_shard", "_bench_line"


def load_zstd_jsonl(path: str):
    """``raw_load_dataset_fn``: the documents of one shard, each tagged with its shard path and line."""
    for line, raw in enumerate(iter_raw_lines(Path(path))):
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("text"), str):
            doc[SHARD_KEY], doc[LINE_KEY] = path, line
            yield doc


def yielded_lines(path: str) -> np.ndarray:
    return np.fromiter((doc[LINE_KEY] for doc in load_zstd_jsonl(path)), dtype=np.int64)


def token_counts(counts_run: Path) -> dict[str, dict[int, tuple[int, int, str]]]:
    """(shard path → line → (tokens, source code, source name)) from a ``select`` run's score files."""
    out: dict[str, dict[int, tuple[int, int, str]]] = {}
    for path in sorted((counts_run / "scores").glob("*.scores.npz")):
        shard = load_shard_scores(path)
        if shard is None:
            raise SystemExit(f"unreadable score file {path}")
        names = shard.source_names
        out[str(Path(shard.path).resolve())] = {
            int(line): (int(tokens), int(code), names[int(code)] if names else "")
            for line, tokens, code in zip(shard.lines, shard.tokens, shard.source_codes, strict=True)
        }
    return out


def run_dsir(pool: str, target: str, counts_run: Path, run: Path, budget: float, seed: int = 0,
             num_proc: int = 1, tokenizer: Path | None = None) -> dict:
    from data_selection import HashedNgramDSIR

    started_cpu, started = time.process_time(), time.perf_counter()
    shards = [str(p.resolve()) for p in discover_shards(pool)]
    run_dir = RunDir(run)
    run_dir.create()
    cache = run / "dsir-cache"
    state = cache / "dsir.pkl"
    dsir = HashedNgramDSIR(raw_datasets=shards, target_datasets=[str(Path(target).resolve())],
                           cache_dir=str(cache), raw_load_dataset_fn=load_zstd_jsonl,
                           target_load_dataset_fn=load_zstd_jsonl, num_proc=num_proc)
    if state.exists():  # importance weights are the expensive part: reuse them when rerunning
        dsir.load(str(state))
        print(f"dsir: reusing importance weights from {state}", flush=True)
    else:
        dsir.fit_importance_estimator(num_tokens_to_fit="auto")
        dsir.compute_importance_weights()
        dsir.save(str(state))
    cpu_weights = time.process_time() - started_cpu
    if not (counts_run / "scores").is_dir():
        print(f"dsir: importance weights ready ({cpu_weights:.0f} CPU-s); no score files in {counts_run} yet, "
              "so no subset written", flush=True)
        return {"cpu_s_weights": cpu_weights}

    # The concatenated order resample() uses: virtual shards in order, each every num_shards-th document.
    counts = token_counts(counts_run)
    order: list[tuple[str, int]] = []
    for params in dsir._get_virtually_sharded_datasets(dsir.raw_datasets):
        lines = yielded_lines(params["path"])
        order += [(params["path"], int(line)) for line in lines[params["shard_idx"] :: params["num_shards"]]]
    parts = dsir._get_virtually_sharded_datasets(dsir.raw_datasets)
    log_w = np.concatenate([np.load(cache / "log_importance_weights" / f"{p['overall_idx']}.npy") for p in parts])
    length = np.concatenate([np.load(cache / "perexample_metadata" / f"{p['overall_idx']}.npy") for p in parts])
    if len(order) != len(log_w):
        raise SystemExit(f"dsir: {len(log_w)} weights for {len(order)} documents: the pool changed since the weights")
    eligible = np.flatnonzero(dsir.perexample_metadata_filter(length))
    tokens = np.array([counts[path][line][0] for path, line in order], dtype=np.int64)
    pool_tokens = int(tokens.sum())
    budget_tokens = int(budget * pool_tokens)

    # Same draw as resample(): Gumbel noise over the eligible documents, then top-k.
    np.random.seed(seed)
    keys = log_w[eligible] + np.random.gumbel(size=eligible.size)
    ranked = eligible[np.argsort(-keys, kind="stable")]
    k = int(np.searchsorted(np.cumsum(tokens[ranked]), budget_tokens, side="right"))
    k = max(1, min(k, ranked.size))
    predicted = {order[i] for i in ranked[:k]}

    out_dir, resample_cache = run / "dsir-resampled", run / "dsir-resample-cache"
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(resample_cache, ignore_errors=True)
    np.random.seed(seed)
    dsir.resample(out_dir=str(out_dir), num_to_sample=k, cache_dir=str(resample_cache))
    chosen: set[tuple[str, int]] = set()
    for path in sorted(out_dir.glob("*.jsonl")):
        with open(path, "rb") as f:
            for raw in f:
                doc = orjson.loads(raw)
                chosen.add((doc[SHARD_KEY], int(doc[LINE_KEY])))
    if chosen != predicted:
        print(f"dsir: warning: resample chose {len(chosen)} documents, {len(chosen ^ predicted)} differ from the "
              "predicted top-k; keeping resample's choice", flush=True)
    manifest = write_subset(run_dir, shards, chosen, counts_run, pool_tokens, budget, budget_tokens, seed, k,
                            tokenizer=tokenizer)
    manifest["cpu_s"] = round(time.process_time() - started_cpu, 2)
    manifest["cpu_s_weights"] = round(cpu_weights, 2)
    manifest["elapsed_s"] = round(time.perf_counter() - started, 2)
    manifest["documents"]["eligible"] = int(eligible.size)
    atomic_write_json(run_dir.selected / "manifest.json", manifest)
    shutil.rmtree(out_dir, ignore_errors=True)
    return manifest


def write_subset(run_dir: RunDir, shards: list[str], chosen: set[tuple[str, int]], counts_run: Path, pool_tokens: int,
                 budget: float, budget_tokens: int, seed: int, k: int, tokenizer: Path | None) -> dict:
    """The chosen documents in ``select``'s layout: byte-exact zstd shards, and the manifest ``select``'s own
    ``ManifestBuilder`` makes, from the counts run's score files and the chosen lines."""
    run_dir.selected.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.selected.glob("*.jsonl.zst"):
        stale.unlink()
    by_path = {str(Path(s.path).resolve()): s for s in map(load_shard_scores, (counts_run / "scores").glob("*.npz"))}
    builder = ManifestBuilder(SelectionFacts(
        run=run_dir.name,
        scorer={"name": "dsir", "package": "data-selection", "ngrams": 2, "num_buckets": 10000,
                "min_example_length": 100, "num_to_sample": k},
        seed=seed, temperature=1.0, unit="tokens", budget_spec=f"{budget:.0%}", budget_amount=budget_tokens,
        pool_total=pool_tokens, keeps_everything=False, first_excluded=None,
        token_counting="the --counts-run selection's counts",
        tokenizer=str(run_dir.tokenizer_path) if tokenizer is not None else "", world_size=1,
    ))
    jobs = []
    for path in shards:
        shard = by_path[path]
        kept_lines = np.array(sorted(line for p, line in chosen if p == path), dtype=np.uint32)
        summary = ShardSummary.of(shard, np.isin(shard.lines, kept_lines))
        if kept_lines.size:
            output = run_dir.selected / output_name(Path(path).name)
            jobs.append(WriteJob(path, str(output), kept_lines))
            summary.output = output.name
        builder.add(summary)
    write_selected_shards(jobs, 0)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, run_dir.tokenizer_path)
    return builder.build(elapsed_s=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--counts-run", required=True, type=Path, help="a select run on the same pool (its score files)")
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--budget", type=float, default=0.3, help="share of the pool's tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--tokenizer", type=Path, default=None, help="copied into the run for pretrain")
    args = parser.parse_args()
    manifest = run_dsir(args.pool, args.target, args.counts_run, args.run, args.budget, args.seed, args.num_proc,
                        args.tokenizer)
    print(json.dumps({k: manifest.get(k) for k in ("documents", "tokens", "cpu_s", "cpu_s_weights", "elapsed_s")}, indent=2))


if __name__ == "__main__":
    main()
