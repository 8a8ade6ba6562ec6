"""Comparing subsets by what they do to training: loss-vs-tokens curves, speed-up, composition.

Pure functions over the run directory contract (``events.jsonl``, ``selected/manifest.json``), shared by
``blissctl demo`` and ``bench/quality.py``.

Speed-up follows the usual data-selection convention (the BLISS paper's "1.7× speed-up"): take the
reference arm's final validation loss as the target; the speed-up of an arm is the number of tokens the
reference needs to first reach that loss divided by the number of tokens the arm needs. Both are read
off piecewise-linear interpolations of the measured curves; an arm that never reaches the target has no
speed-up (``None``: slower than the reference by an unknown factor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

Curve = list[tuple[int, float]]
"""Validation loss against training tokens: ``[(tokens, loss), ...]`` in increasing tokens."""


@dataclass(frozen=True)
class ArmSummary:
    """One arm of a comparison: a selected subset and the model pretrained on it."""

    name: str
    curve: Curve
    final_loss: float | None
    bits_per_byte: float | None = None
    perplexity: float | None = None
    speedup: float | None = None
    tokens_to_target: float | None = None


# ---- reading run directories ---------------------------------------------------------------------------


def read_events(run_root: Path | str, stage: str | None = None) -> list[dict[str, Any]]:
    """Every well-formed event of ``run_root/events.jsonl`` (of ``stage`` if given); a torn line is skipped."""
    path = Path(run_root) / "events.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_bytes().splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if stage is None or event.get("stage") == stage:
            events.append(event)
    return events


def pretrain_curve(run_root: Path | str, *, branch: str | None = None) -> Curve:
    """Validation loss against tokens trained, from the ``pretrain`` stage's ``eval`` events of the main
    line (or of ``branch``, e.g. ``"decay"``).

    Tokens are the event's ``tokens_seen`` (every token the model trained on, earlier runs it was
    continued from included), else ``step × global_batch_tokens`` of the run's (last) ``start`` event;
    a step evaluated twice (a resumed run) keeps its last value.
    """
    events = read_events(run_root, "pretrain")
    batch_tokens = None
    by_step: dict[int, tuple[int, float]] = {}
    for event in events:
        if event.get("kind") == "start" and event.get("global_batch_tokens"):
            batch_tokens = int(event["global_batch_tokens"])
        elif event.get("kind") == "eval" and event.get("loss_val") is not None and event.get("branch") == branch:
            step = int(event["step"])
            tokens = event.get("tokens_seen")
            if tokens is None and batch_tokens:
                tokens = step * batch_tokens
            if tokens is not None:
                by_step[step] = (int(tokens), float(event["loss_val"]))
    return [by_step[step] for step in sorted(by_step)]


def last_eval(run_root: Path | str) -> dict[str, Any] | None:
    """The last ``blissctl eval`` result appended to ``run_root/events.jsonl`` (loss, perplexity, bits/byte)."""
    results = [e for e in read_events(run_root, "eval") if e.get("kind") == "eval"]
    return results[-1] if results else None


def stage_done(run_root: Path | str, stage: str) -> bool:
    """Whether ``stage`` finished in this run (its last start is followed by a ``done`` event)."""
    done = False
    for event in read_events(run_root, stage):
        if event.get("kind") == "start":
            done = False
        elif event.get("kind") == "done":
            done = True
    return done


def gpu_seconds(run_root: Path | str, stage: str) -> float:
    """The GPU-seconds a stage held: for each launch (a ``start`` event), the time to that launch's last
    event × the GPUs it ran on (its ``world_size`` on a CUDA device, none on a CPU). A killed launch
    counts too, up to its last event."""
    total, launch_start, launch_end, gpus = 0.0, None, None, 0
    for event in [*read_events(run_root, stage), {"kind": "start"}]:  # the sentinel closes the last launch
        if event.get("kind") == "start":
            if launch_start is not None:
                total += (launch_end - launch_start) * gpus
            launch_start = launch_end = event.get("ts")
            cuda = str(event.get("device", "cpu")).startswith("cuda")
            gpus = int(event.get("world_size") or 1) if cuda else 0
        elif launch_start is not None and event.get("ts") is not None:
            launch_end = event["ts"]
    return round(total, 1)


def read_manifest(selected: Path | str) -> dict[str, Any]:
    return orjson.loads((Path(selected) / "manifest.json").read_bytes())


# ---- curves and speed-up -------------------------------------------------------------------------------


def tokens_to_reach(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """Tokens at which ``curve`` first reaches ``target`` (≤), interpolating linearly between points.

    ``None`` when it never does. A curve already at or under the target at its first point reaches it there
    (there is no earlier measurement to interpolate from).
    """
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(tokens)
            t0, l0 = previous
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
        previous = (tokens, loss)
    return None


def speedup(reference: Sequence[tuple[int, float]], curve: Sequence[tuple[int, float]]) -> float | None:
    """Tokens the reference needs to reach its own final loss ÷ tokens ``curve`` needs to reach it."""
    if not reference or not curve:
        return None
    target = reference[-1][1]
    needed_reference = tokens_to_reach(reference, target)
    needed = tokens_to_reach(curve, target)
    if needed_reference is None or needed is None or needed <= 0:
        return None
    return needed_reference / needed


def relative_speedup(reference: Sequence[tuple[int, float]], curve: Sequence[tuple[int, float]]) -> float | None:
    """``speedup`` when ``curve`` reaches the reference's final loss; otherwise the slow-down it implies.

    A curve that never gets down to the reference's final loss still has a final loss of its own; the
    reference reached *that* after some tokens, so the arm needed all its tokens for what the reference did
    in fewer: the ratio (below 1) says how much slower it is. ``None`` only when neither is measurable.
    """
    faster = speedup(reference, curve)
    if faster is not None or not reference or not curve:
        return faster
    if reference[0][1] <= curve[-1][1]:  # the reference was there before its first measurement: unknown when
        return None
    needed_reference = tokens_to_reach(reference, curve[-1][1])
    if needed_reference is None or curve[-1][0] <= 0:
        return None
    return needed_reference / curve[-1][0]


def summarise_arms(curves: Mapping[str, Curve], reference: str,
                   evals: Mapping[str, Mapping[str, Any] | None] | None = None) -> list[ArmSummary]:
    """One ``ArmSummary`` per arm, in the order given; speed-ups against the ``reference`` arm."""
    if reference not in curves:
        raise KeyError(f"reference arm {reference!r} is not among {list(curves)}")
    ref = curves[reference]
    target = ref[-1][1] if ref else None
    out = []
    for name, curve in curves.items():
        result = (evals or {}).get(name) or {}
        out.append(ArmSummary(
            name=name, curve=list(curve),
            final_loss=result.get("loss_val", curve[-1][1] if curve else None),
            bits_per_byte=result.get("bits_per_byte"), perplexity=result.get("perplexity"),
            speedup=speedup(ref, curve), tokens_to_target=None if target is None else tokens_to_reach(curve, target),
        ))
    return out


def loss_table(curves: Mapping[str, Curve]) -> tuple[list[str], list[list[Any]]]:
    """Rows ``[tokens, loss of each arm ...]`` over the union of the arms' token counts (``None`` = not measured)."""
    names = list(curves)
    points = sorted({tokens for curve in curves.values() for tokens, _ in curve})
    lookup = {name: dict(curve) for name, curve in curves.items()}
    rows = [[tokens] + [lookup[name].get(tokens) for name in names] for tokens in points]
    return ["tokens"] + names, rows


# ---- what each subset contains -------------------------------------------------------------------------


def composition(manifest: Mapping[str, Any]) -> dict[str, float]:
    """Share of the subset's tokens from each ``source``, largest first (empty when the pool has none)."""
    by_source = manifest.get("by_source") or {}
    kept = sum(f["tokens_kept"] for f in by_source.values())
    if not kept:
        return {}
    shares = {name: f["tokens_kept"] / kept for name, f in by_source.items() if f["tokens_kept"]}
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


def format_speedup(value: float | None) -> str:
    return "not reached" if value is None or not math.isfinite(value) else f"{value:.2f}×"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub markdown table; floats to ``digits`` places, ints with thousands separators, None as ``-``."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return str(value)
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
