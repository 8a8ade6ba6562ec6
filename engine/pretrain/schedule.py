"""Learning-rate schedule of the Pythia suite: linear warm-up over 1% of the steps, then cosine decay
to 10% of the peak. Pure functions; the trainer wraps them in a ``LambdaLR`` so the scheduler state is
checkpointed like any other.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_frac: float) -> int:
    """Warm-up length: ``warmup_frac`` of the run, at least one step when warm-up is on."""
    if warmup_frac <= 0:
        return 0
    return max(1, round(total_steps * warmup_frac))


def lr_multiplier(step: int, *, total_steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Factor on the peak learning rate for optimiser step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineWithWarmup:
    """A picklable callable for ``torch.optim.lr_scheduler.LambdaLR``."""

    def __init__(self, total_steps: int, warmup_frac: float, min_ratio: float):
        self.total_steps = total_steps
        self.warmup = warmup_steps(total_steps, warmup_frac)
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, total_steps=self.total_steps, warmup=self.warmup, min_ratio=self.min_ratio)
