"""Which run directories the dashboard follows: named on the command line, or all under ``runs/``.

An experiment folder (``RUNS/EXP/experiment.json`` beside one run directory per stage) is one source:
discovery lists it once, not its stage runs; a stage run is still followed alone when named by path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tui.experiment import EXPERIMENT_FILE, is_experiment


@dataclass(frozen=True, slots=True)
class RunSource:
    """A run directory to follow; it need not exist yet (the dashboard waits for it)."""

    name: str
    """How the run is shown: its directory name."""
    path: Path

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def is_experiment(self) -> bool:
        """Looked up each time: a folder named before ``blissctl rounds`` plans it becomes one later."""
        return is_experiment(self.path)


def run_source(argument: str, runs_dir: Path) -> RunSource:
    """``argument`` as a run: a path to a run directory when one is there (or it looks like a path),
    else a name under ``runs_dir``. The CLI's rule (``engine.run_dir.run_path``), written again here
    because the dashboard never imports the engine."""
    as_path = Path(argument)
    if as_path.is_dir() or "/" in argument or argument.startswith("."):
        return RunSource(as_path.resolve().name or argument, as_path)
    return RunSource(argument, runs_dir / argument)


def discover_runs(runs_dir: Path) -> list[RunSource]:
    """Every run directory and experiment folder under ``runs_dir``, newest first (by when its event log,
    or the experiment's plan, last changed)."""
    if not runs_dir.is_dir():
        return []

    def last_change(path: Path) -> float:
        # An experiment rewrites its plan as each stage finishes: that is when it last changed.
        for name in ("events.jsonl", EXPERIMENT_FILE):
            try:
                return (path / name).stat().st_mtime
            except OSError:
                continue
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    found = [path for path in runs_dir.iterdir() if path.is_dir() and not path.name.startswith(".")]
    found.sort(key=lambda path: (last_change(path), path.name), reverse=True)
    return [RunSource(path.name, path) for path in found]
