"""Which sequences each rank reads at each step: a pure function of (seed, position), so a resumed run,
or one on another number of ranks, reads exactly the same sequences at the same steps."""

from __future__ import annotations

import numpy as np

from engine.errors import UserError


class SequenceOrder:
    """Sequence index for each position of the run: a fresh seeded permutation every epoch."""

    def __init__(self, n_sequences: int, seed: int):
        if n_sequences < 1:
            raise UserError("the training data is shorter than one sequence; lower --seq-len or add data")
        self.n = n_sequences
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sequence indices of run positions ``start … start+count-1``."""
        out = np.empty(count, dtype=np.int64)
        for i, pos in enumerate(range(start, start + count)):
            epoch, offset = divmod(pos, self.n)
            out[i] = self.permutation(epoch)[offset]
        return out


def micro_batch_start(step: int, micro: int, *, rank: int, world_size: int, micro_batch: int,
                      batch_sequences: int) -> int:
    """First run position of the micro-batch ``micro`` of ``rank`` at ``step``: ranks interleave."""
    return step * batch_sequences + (micro * world_size + rank) * micro_batch
