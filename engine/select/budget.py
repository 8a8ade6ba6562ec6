"""Selection budgets: ``30%`` of the pool, or an absolute ``2M`` tokens / ``5000`` documents."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from engine.errors import UserError

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|[kmbgt])?\s*$", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How much of the pool to keep, in the unit of ``--unit`` (tokens or documents)."""

    spec: str
    """As the user wrote it (``30%``, ``2M``)."""
    fraction: float | None = None
    """Set for percentages: the share of the pool's total to keep, in (0, 1]."""
    amount: int | None = None
    """Set for absolute budgets: how many tokens or documents to keep."""

    def resolve(self, total: int) -> int:
        """The absolute budget once the pool's total is known."""
        if self.fraction is not None:
            return int(math.floor(self.fraction * total + 1e-9))
        assert self.amount is not None
        return self.amount


def parse_budget(spec: str) -> Budget:
    """Parse ``--budget``: a percentage in (0, 100] or a positive count with an optional k/M/B suffix."""
    match = _PATTERN.match(str(spec))
    if not match:
        raise UserError(f"--budget {spec!r} is not a budget: give a percentage (30%) or a count (2M, 500k, 10000)")
    number, suffix = float(match.group(1)), (match.group(2) or "").lower()
    if suffix == "%":
        if number <= 0:
            raise UserError(f"--budget {spec}: a budget of 0% keeps nothing; give a share above 0%")
        if number > 100:
            raise UserError(f"--budget {spec}: a share cannot exceed 100%")
        return Budget(spec=spec, fraction=number / 100)
    exact = number * _SUFFIXES[suffix]
    if abs(exact - round(exact)) > 1e-9 * max(1.0, exact):
        raise UserError(f"--budget {spec}: give a whole number of documents or tokens ({exact:g} is not), "
                        "or a percentage")
    amount = int(round(exact))
    if amount <= 0:
        raise UserError(f"--budget {spec}: a budget of 0 keeps nothing; give a positive amount")
    return Budget(spec=spec, amount=amount)
