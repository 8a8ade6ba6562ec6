"""A bounded, exact top-k by weight (tokens or documents) over a stream of scored documents.

Every document is reduced to one ``uint64`` rank key — ``(descending score bits << 32) | ordinal`` — so
that ascending key order is "best score first, ties broken by document id", and a weight. The kept set
is the longest prefix of that order whose weights sum to at most the budget: exactly what a full sort
would keep. Memory is two compact arrays (12 bytes a document) holding the kept set plus one boundary
document, and a pending buffer of at most a quarter of that; everything ranked below the boundary is
dropped on arrival, since documents arriving later can only push it further out. Pending documents
are merged in once they reach a sixteenth of the kept set, which bounds the peak of a merge at about
30 bytes a kept document (old arrays, merged arrays, a one-byte mask and the pending batch).
"""

from __future__ import annotations

import numpy as np

_MIN_PENDING = 1 << 12
_SUM_BLOCK = 1 << 14


def descending_score_bits(values: np.ndarray) -> np.ndarray:
    """uint32 codes whose ascending order is the descending order of the float32 ``values``.

    NaN sorts last (worst), so a scorer that fails on one document never displaces a real score.
    """
    values = np.asarray(values, dtype=np.float32)
    values = np.where(np.isnan(values), np.float32(-np.inf), values)
    bits = values.view(np.uint32)
    # IEEE floats order like sign-magnitude integers: flip negatives entirely, set the sign bit of
    # positives, and the unsigned order matches the float order.
    ascending = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
    return ~ascending


def rank_keys(values: np.ndarray, ordinals: np.ndarray) -> np.ndarray:
    """uint64 keys: ascending order = higher ``values`` first, then lower ``ordinals`` (document ids)."""
    return (descending_score_bits(values).astype(np.uint64) << np.uint64(32)) | ordinals.astype(np.uint64)


def _prefix_within(weights: np.ndarray, budget: int) -> int:
    """How many leading ``weights`` fit in ``budget``; sums in blocks to avoid an n-long cumsum array."""
    if weights.size == 0:
        return 0
    usable = weights[: (weights.size // _SUM_BLOCK) * _SUM_BLOCK]
    block_sums = usable.reshape(-1, _SUM_BLOCK).sum(axis=1, dtype=np.uint64) if usable.size else np.empty(0, np.uint64)
    cumulative = np.cumsum(block_sums, dtype=np.uint64)
    full_blocks = int(np.searchsorted(cumulative, np.uint64(budget), side="right"))
    used = int(cumulative[full_blocks - 1]) if full_blocks else 0
    start = full_blocks * _SUM_BLOCK
    tail = np.cumsum(weights[start : start + _SUM_BLOCK], dtype=np.uint64) + np.uint64(used)
    return start + int(np.searchsorted(tail, np.uint64(budget), side="right"))


def _merge_sorted(old_keys, old_weights, new_keys, new_weights) -> tuple[np.ndarray, np.ndarray]:
    """Merge a small sorted batch into the sorted kept set (keys are unique).

    Written out rather than ``np.insert`` because insert's temporaries (an index copy, a sort of it,
    an arange) cost several bytes a kept document at every merge; here the only temporary the size of
    the kept set is a one-byte mask, and numpy assigns through a 1-D boolean mask without indices.
    """
    size = old_keys.size + new_keys.size
    destination = np.searchsorted(old_keys, new_keys)
    destination += np.arange(new_keys.size)
    keys = np.empty(size, np.uint64)
    weights = np.empty(size, np.uint32)
    keys[destination] = new_keys
    weights[destination] = new_weights
    from_old = np.ones(size, bool)
    from_old[destination] = False
    keys[from_old] = old_keys
    weights[from_old] = old_weights
    return keys, weights


class TopKByWeight:
    """Keep the best documents whose weights sum to at most ``budget``, exactly, in bounded memory."""

    def __init__(self, budget: int):
        if budget <= 0:
            raise ValueError("budget must be positive")
        self.budget = int(budget)
        self._keys = np.empty(0, np.uint64)  # sorted ascending: kept prefix, then maybe one boundary
        self._weights = np.empty(0, np.uint32)
        self._n_kept = 0
        self._pending_keys: list[np.ndarray] = []
        self._pending_weights: list[np.ndarray] = []
        self._n_pending = 0

    @property
    def cutoff(self) -> int | None:
        """Key of the first document that did not fit; anything ranked at or below it is out for good."""
        self._compact()
        return int(self._keys[self._n_kept]) if self._keys.size > self._n_kept else None

    def push(self, keys: np.ndarray, weights: np.ndarray) -> None:
        keys = np.asarray(keys, np.uint64)
        weights = np.asarray(weights, np.uint32)
        start = 0
        while start < keys.size:
            # Slices no larger than the pending allowance keep each merge's temporaries bounded, and
            # the cutoff tightens after every merge, so later slices are filtered harder.
            stop = start + self._pending_allowance() - self._n_pending
            self._push_slice(keys[start:stop], weights[start:stop])
            start = stop

    def _pending_allowance(self) -> int:
        return max(_MIN_PENDING, self._n_kept // 16)

    def _push_slice(self, keys: np.ndarray, weights: np.ndarray) -> None:
        cutoff = int(self._keys[self._n_kept]) if self._keys.size > self._n_kept else None
        if cutoff is not None:
            live = keys < np.uint64(cutoff)
            keys, weights = keys[live], weights[live]
        elif keys.base is not None:
            keys, weights = keys.copy(), weights.copy()  # do not pin the caller's whole array
        if keys.size == 0:
            return
        self._pending_keys.append(keys)
        self._pending_weights.append(weights)
        self._n_pending += keys.size
        if self._n_pending >= self._pending_allowance():
            self._compact()

    def _compact(self) -> None:
        if not self._n_pending:
            return
        new_keys = np.concatenate(self._pending_keys)
        new_weights = np.concatenate(self._pending_weights)
        self._pending_keys.clear()
        self._pending_weights.clear()
        self._n_pending = 0
        order = np.argsort(new_keys, kind="stable")
        new_keys, new_weights = new_keys[order], new_weights[order]
        del order
        keys, weights = _merge_sorted(self._keys, self._weights, new_keys, new_weights)
        del new_keys, new_weights
        self._keys = self._weights = None  # let the old arrays go before anything else is allocated
        n_kept = _prefix_within(weights, self.budget)
        end = min(n_kept + 1, keys.size)  # keep the boundary document: it bounds all later arrivals
        # Views, not copies: the dropped tail is at most the pending batch, and a copy would briefly
        # hold the kept set twice.
        self._keys, self._weights, self._n_kept = keys[:end], weights[:end], n_kept

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept documents' keys (best first) and weights."""
        self._compact()
        return self._keys[: self._n_kept], self._weights[: self._n_kept]

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """Kept set plus boundary: what another ``TopKByWeight`` with the same budget needs to merge this one."""
        self._compact()
        return self._keys, self._weights

    def merge(self, other_state: tuple[np.ndarray, np.ndarray]) -> None:
        """Add another top-k's ``state()`` (e.g. from another rank): the result is exact."""
        self.push(*other_state)

    @property
    def kept_weight(self) -> int:
        _, weights = self.kept()
        return int(weights.sum(dtype=np.uint64))

    @property
    def nbytes(self) -> int:
        pending = sum(k.nbytes for k in self._pending_keys) + sum(w.nbytes for w in self._pending_weights)
        held = (self._keys.base if self._keys.base is not None else self._keys).nbytes
        held += (self._weights.base if self._weights.base is not None else self._weights).nbytes
        return held + pending
