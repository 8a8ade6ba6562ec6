"""Learning-rate schedules of ``blissctl pretrain`` (``--lr-schedule``), as factors on the peak rate.

- ``cosine`` (default, the Pythia suite's): linear warm-up over ``--warmup`` of the steps, then cosine
  decay to ``min_ratio`` (10%) of the peak.
- ``constant``: warm-up, then the peak rate to the end. What BLISS's rounds use: each round continues
  the model at a constant rate (halved every round), so a round's end is not a decayed dead end and
  the next round can go on from it.
- ``wsd`` (warm-up, stable, decay): warm-up, the peak rate, then a linear decay to ``min_ratio`` over
  the last ``WSD_DECAY_FRACTION`` of the steps.

``--decay-steps N`` adds an evaluation branch after the main line: N more steps whose rate falls
linearly from where the main line ended to ``min_ratio`` of it (``decay_branch_multiplier``). A
constant-rate model is only comparable to a decayed one after such a cool-down; the branch is
evaluated and kept beside the main line, which the next round continues undecayed.

Pure functions of the step: nothing about a schedule needs saving, and a resume recomputes it.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant", "wsd")
WSD_DECAY_FRACTION = 0.2
"""Share of the steps a ``wsd`` schedule spends decaying (the MiniCPM / WSD papers use 10–20%)."""


def warmup_steps(total_steps: int, warmup_frac: float) -> int:
    """Warm-up length: ``warmup_frac`` of the run, at least one step when warm-up is on."""
    if warmup_frac <= 0:
        return 0
    return max(1, round(total_steps * warmup_frac))


def lr_multiplier(step: int, *, total_steps: int, warmup: int, min_ratio: float = 0.1,
                  schedule: str = "cosine") -> float:
    """Factor on the peak learning rate for optimiser step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay = max(1, round((total_steps - warmup) * WSD_DECAY_FRACTION))
        into_decay = step - (total_steps - decay)
        if into_decay < 0:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * min(1.0, (into_decay + 1) / decay)
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_branch_multiplier(branch_step: int, *, decay_steps: int, start: float, min_ratio: float) -> float:
    """Factor for step ``branch_step`` (0-based) of the evaluation branch: linear from ``start`` (the
    main line's last factor) down to ``min_ratio × start`` at its last step."""
    progress = min(1.0, (branch_step + 1) / max(1, decay_steps))
    return start * (1.0 - (1.0 - min_ratio) * progress)


class Schedule:
    """A picklable callable: step → factor on the peak rate."""

    def __init__(self, total_steps: int, warmup_frac: float, min_ratio: float, kind: str = "cosine"):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}")
        self.total_steps = total_steps
        self.warmup = warmup_steps(total_steps, warmup_frac)
        self.min_ratio = min_ratio
        self.kind = kind

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, total_steps=self.total_steps, warmup=self.warmup, min_ratio=self.min_ratio,
                             schedule=self.kind)
