"""The bounded top-k keeps exactly what a full sort would, in memory that follows the kept set."""

from __future__ import annotations

import numpy as np
import pytest

from engine.select.topk import TopKByWeight, descending_score_bits, rank_keys


def full_sort_selection(scores, weights, budget):
    order = np.lexsort((np.arange(scores.size), -scores.astype(np.float64)))  # score desc, then id asc
    n = np.searchsorted(np.cumsum(weights[order].astype(np.int64)), budget, side="right")
    return np.sort(order[:n])


def kept_ids(topk):
    keys, _ = topk.kept()
    return np.sort((keys & np.uint64(0xFFFFFFFF)).astype(np.int64))


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_full_sort_including_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1_000, 200_000))
    scores = rng.random(n).astype(np.float32)
    scores[rng.random(n) < 0.2] = 0.5  # many exact ties: broken by document id
    weights = rng.integers(1, 2_000, n).astype(np.uint32)
    budget = int(rng.integers(1, int(weights.sum())))
    topk = TopKByWeight(budget)
    keys = rank_keys(scores, np.arange(n))
    for chunk in np.array_split(rng.permutation(n), 13):  # arrival order must not matter
        topk.push(keys[chunk], weights[chunk])
    np.testing.assert_array_equal(kept_ids(topk), full_sort_selection(scores, weights, budget))
    assert topk.kept_weight <= budget


def test_merging_per_rank_states_is_exact():
    rng = np.random.default_rng(1)
    n = 90_000
    scores = rng.random(n).astype(np.float32)
    weights = rng.integers(1, 500, n).astype(np.uint32)
    budget = int(weights.sum() * 0.3)
    keys = rank_keys(scores, np.arange(n))
    merged = TopKByWeight(budget)
    for rank in range(3):
        part = TopKByWeight(budget)
        part.push(keys[rank::3], weights[rank::3])
        merged.merge(part.state())
    np.testing.assert_array_equal(kept_ids(merged), full_sort_selection(scores, weights, budget))


def test_budget_over_the_pool_keeps_everything_and_has_no_cutoff():
    topk = TopKByWeight(10**9)
    topk.push(rank_keys(np.array([0.1, 0.9], np.float32), np.arange(2)), np.array([5, 5], np.uint32))
    assert kept_ids(topk).tolist() == [0, 1] and topk.cutoff is None


def test_memory_follows_the_kept_set_not_the_stream():
    import tracemalloc

    rng = np.random.default_rng(2)
    kept_docs = 200_000
    topk = TopKByWeight(budget=kept_docs)  # documents of weight 1
    stream = [  # 2M documents, 10x the kept set, arriving in shard-sized batches
        (rank_keys(rng.random(100_000).astype(np.float32), np.arange(i * 100_000, (i + 1) * 100_000)),
         np.ones(100_000, np.uint32))
        for i in range(20)
    ]
    tracemalloc.start()  # numpy reports its buffers to tracemalloc: this is the structure's own memory
    for keys, weights in stream:
        topk.push(keys, weights)
    kept, _ = topk.kept()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert kept.size == kept_docs
    assert peak <= 32 * kept_docs  # the goal, merge temporaries included
    assert topk.nbytes <= 12 * (kept_docs * 17 // 16 + 2)


def test_score_bits_order_every_float_correctly():
    values = np.array([-np.inf, -3.5, -0.0, 0.0, 1e-30, 0.25, 1.0, np.inf, np.nan], np.float32)
    order = np.argsort(descending_score_bits(values), kind="stable")
    # best first; NaN counts as the worst score; -0.0 and 0.0 are equal scores in either order
    assert values[order][:6].tolist() == [np.inf, 1.0, 0.25, np.float32(1e-30), 0.0, 0.0]
    assert values[order][6] == -3.5 and values[order][7] == -np.inf and np.isnan(values[order][8])
