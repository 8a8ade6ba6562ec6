"""What can score a document for ``select``: the registry.

A scorer is one module of this package and one ``ScorerEntry`` below: its name (the ``--scorer``
choice), one line of help (the CLI's ``--help`` comes from here), what it needs from the user, and
where its ``build(context)`` lives, imported only when that scorer is chosen, so that
``blissctl --help`` stays quick. The interface every scorer satisfies is ``base.Scorer``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import UserError

if TYPE_CHECKING:
    from engine.select.scorers.base import Scorer, ScorerContext


@dataclass(frozen=True)
class ScorerEntry:
    name: str
    help: str
    module: str
    """The module (in this package) whose ``build(context) -> Scorer`` makes the scorer."""
    needs_run: bool = False
    """Needs ``--scorer-run``: a train-scorer run (or one of its files)."""
    needs_val: bool = False
    """Needs ``--val``: the target documents."""

    def build(self, context: ScorerContext) -> Scorer:
        return importlib.import_module(f"engine.select.scorers.{self.module}").build(context)


REGISTRY: dict[str, ScorerEntry] = {entry.name: entry for entry in (
    ScorerEntry("random", "uniform scores hashed from (seed, document id): the control arm", "random"),
    ScorerEntry("bliss", "the score model of a train-scorer run (--scorer-run)", "bliss", needs_run=True),
    ScorerEntry("perplexity", "lowest perplexity under the warmed-up proxy of a train-scorer run (--scorer-run)",
                "perplexity", needs_run=True),
    ScorerEntry("dsir", "DSIR's hashed n-gram importance weights towards the target documents (--val)", "dsir",
                needs_val=True),
)}


def scorer_entry(name: str) -> ScorerEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"--scorer {name!r}: choose one of {', '.join(REGISTRY)}") from None


def scorer_help() -> str:
    """The ``--scorer`` help text: every registered scorer with its line."""
    return "; ".join(f"{entry.name} ({entry.help})" for entry in REGISTRY.values()) + "."
