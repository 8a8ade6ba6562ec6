"""``--scorer dsir``'s weights against the reference ``data_selection.HashedNgramDSIR``: the same, how much faster.

Both estimators are fitted on the same sample of one pool shard (its first ``--sample-docs`` documents)
toward the target, with the reference's defaults (unigrams + bigrams, 10,000 buckets, documents under 100
words filtered); both then weigh every document of the shard. Printed: whether the per-bucket log ratios
are bit-identical, Spearman rank correlation and largest differences of the log importance weights,
agreement of the length filter, and documents per second of each, measured in the same run.

The reference runs as ``dsir_baseline.py`` drives it, with ``num_proc=1`` (one core each, and the output
order is the shard's order). Documents reach both from memory, so the timings are featurising and weighing
only: the reference's ``compute_importance_weights`` path, and ``DsirModel.weigh`` in batches of 512, as a
reader worker would call it.

    python bench/bench_dsir.py --shard ../shared/corpus/pool/c4-train.00000-of-00008.jsonl.zst \\
        --target ../shared/corpus/val/narrative.jsonl.zst --sample-docs 5000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's progress bars would interleave with the figures

from bench._common import POOL, VAL, record  # noqa: E402
from engine.data.sources import read_texts  # noqa: E402
from engine.select.scorers.dsir_ngrams import DsirConfig, fit_dsir  # noqa: E402

SCORE_BATCH_DOCS = 512


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..N-1, tied values sharing the mean of their ranks (as Spearman's rho wants)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(values.size, dtype=np.float64)
    _, tie_group, tie_sizes = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(tie_group, weights=ranks) / tie_sizes)[tie_group]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


def encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def timed(work):
    """(result, wall seconds, CPU seconds): CPU time is the steadier figure on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_reference(sample: list[str], shard: list[str], target: list[str], cache: Path) -> dict:
    from data_selection import HashedNgramDSIR

    texts = {"sample": sample, "shard": shard, "target": target}

    def load(name: str):  # raw_load_dataset_fn: documents straight from memory, no parsing to time
        return ({"text": text} for text in texts[name])

    dsir = HashedNgramDSIR(["sample"], ["target"], cache_dir=str(cache), raw_load_dataset_fn=load,
                           target_load_dataset_fn=load, num_proc=1)
    _, fit_wall, fit_cpu = timed(lambda: dsir.fit_importance_estimator(num_tokens_to_fit="auto"))
    dsir.raw_datasets = ["shard"]  # fitted on the sample; now weigh the whole shard with that estimator
    _, weigh_wall, weigh_cpu = timed(dsir.compute_importance_weights)
    lengths = np.load(cache / "perexample_metadata" / "0.npy")
    return {"log_ratio": dsir.log_diff, "weights": np.load(cache / "log_importance_weights" / "0.npy"),
            "eligible": dsir.perexample_metadata_filter(lengths), "fit_wall": fit_wall, "fit_cpu": fit_cpu,
            "weigh_wall": weigh_wall, "weigh_cpu": weigh_cpu}


def run_ours(sample: list[str], shard: list[str], target: list[str]) -> dict:
    model, fit_wall, fit_cpu = timed(lambda: fit_dsir(sample, target, DsirConfig()))

    def weigh_in_batches():
        parts = [model.weigh(shard[i : i + SCORE_BATCH_DOCS]) for i in range(0, len(shard), SCORE_BATCH_DOCS)]
        return np.concatenate([p.log_importance for p in parts]), np.concatenate([p.eligible for p in parts])

    (weights, eligible), weigh_wall, weigh_cpu = timed(weigh_in_batches)
    return {"log_ratio": model.log_ratio, "weights": weights, "eligible": eligible, "fit_wall": fit_wall,
            "fit_cpu": fit_cpu, "weigh_wall": weigh_wall, "weigh_cpu": weigh_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard", type=Path, default=POOL / "c4-train.00000-of-00008.jsonl.zst")
    parser.add_argument("--target", type=Path, default=VAL)
    parser.add_argument("--sample-docs", type=int, default=5000, help="raw documents both fit on (the shard's first)")
    args = parser.parse_args()

    shard = read_texts(args.shard)
    target = read_texts(args.target)
    shard = [text for text in shard if encodes_as_utf8(text)]  # the reference raises on a lone surrogate
    sample = shard[: args.sample_docs]
    print(f"shard {args.shard.name}: {len(shard):,} documents, fitting on the first {len(sample):,}; "
          f"target {args.target.name}: {len(target):,} documents", flush=True)

    ours = run_ours(sample, shard, target)
    with tempfile.TemporaryDirectory(prefix="check-dsir-") as cache:
        theirs = run_reference(sample, shard, target, Path(cache))

    both = ours["eligible"] & theirs["eligible"]
    difference = np.abs(ours["weights"] - theirs["weights"])
    figures = {
        "shard": args.shard.name,
        "documents": len(shard),
        "sample_docs": len(sample),
        "target_docs": len(target),
        "log_ratio_bit_identical": bool(np.array_equal(ours["log_ratio"], theirs["log_ratio"])),
        "spearman_all": round(spearman(ours["weights"], theirs["weights"]), 9),
        "spearman_eligible": round(spearman(ours["weights"][both], theirs["weights"][both]), 9),
        "max_abs_diff": float(difference.max()),
        "max_rel_diff": float((difference / np.maximum(np.abs(theirs["weights"]), 1e-300)).max()),
        "weights_bit_identical_share": float(np.mean(ours["weights"] == theirs["weights"])),
        "eligible_agree": bool(np.array_equal(ours["eligible"], theirs["eligible"])),
        "eligible_docs": int(theirs["eligible"].sum()),
        "weigh_docs_per_s": {"ours": round(len(shard) / ours["weigh_wall"], 1),
                             "reference": round(len(shard) / theirs["weigh_wall"], 1)},
        "weigh_speedup_wall": round(theirs["weigh_wall"] / ours["weigh_wall"], 2),
        "weigh_speedup_cpu": round(theirs["weigh_cpu"] / ours["weigh_cpu"], 2),
        "fit_docs_per_s": {"ours": round((len(sample) + len(target)) / ours["fit_wall"], 1),
                           "reference": round((len(sample) + len(target)) / theirs["fit_wall"], 1)},
        "fit_speedup_cpu": round(theirs["fit_cpu"] / ours["fit_cpu"], 2),
    }
    record("dsir", figures)


if __name__ == "__main__":
    main()
