"""Experiment folders as ``blissctl rounds`` writes them (the contract in ``tui/experiment.py``), for
the dashboard's tests: ``experiment.json``, one run directory per stage, ``rounds-result.json``.

Two rounds: round 0 selects at random, pretrains and warms the proxy up; round 1 trains the score
model, selects with it and pretrains on (continuing round 0's model: its ``tokens_seen`` go on from
round 0's, while its steps count from zero again). Each pretrain run ends with a decayed evaluation
branch (``"branch": "decay"``), lower than its main line.
"""

from __future__ import annotations

from pathlib import Path

import orjson

T0 = 1_790_000_000.0
BATCH_TOKENS = 4096
STEPS_PER_ROUND = 40
EVAL_EVERY = 10
DECAY_GAIN = 0.3
"""How much lower the decayed branch evaluates than the main line (not a multiple of the main line's steps)."""

STAGES = [
    {"round": 0, "role": "select", "run": "r0-select", "title": "round 0: select 20% at random"},
    {"round": 0, "role": "pretrain", "run": "r0-lm", "title": "round 0: pretrain tiny"},
    {"round": 0, "role": "proxy", "run": "r0-proxy", "title": "round 0: proxy warm-up"},
    {"round": 1, "role": "train-scorer", "run": "r1-scorer", "title": "round 1: train the score model"},
    {"round": 1, "role": "select", "run": "r1-select", "title": "round 1: select 20% with BLISS"},
    {"round": 1, "role": "pretrain", "run": "r1-lm", "title": "round 1: pretrain tiny, continued"},
]


def write_json(path: Path, record: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps(record))
    temporary.replace(path)  # atomically, as the contract says


def write_plan(root: Path, stages: list[dict] | None = None, timings: dict | None = None, **extra) -> None:
    write_json(root / "experiment.json", {
        "kind": "rounds", "name": root.name, "settings": {"budget": "20%", "rounds": 2, "size": "tiny"},
        "stages": STAGES if stages is None else stages, "timings": timings or {},
        "schema_hint": "unknown keys must be ignored", **extra,
    })


def append_events(run_dir: Path, events: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "events.jsonl", "ab") as file:
        file.write(b"".join(orjson.dumps(event) + b"\n" for event in events))


def select_events(t: float, done: bool = True) -> list[dict]:
    events = [{"ts": t, "stage": "select", "kind": "start", "budget": "20%", "scorer": "random"}]
    events += [{"ts": t + i, "stage": "select", "kind": "progress", "fraction": i / 4, "docs_per_s": 900.0}
               for i in range(1, 4)]
    if done:
        events.append({"ts": t + 4, "stage": "select", "kind": "done", "docs_kept": 480, "threshold": 0.7})
    return events


def scorer_events(t: float, warmup_only: bool) -> list[dict]:
    events = [{"ts": t, "stage": "train-scorer", "kind": "start"}]
    events += [{"ts": t + i, "stage": "train-scorer", "kind": "warmup", "step": i, "loss": 8 - i / 10,
                "fraction": i / 20} for i in range(1, 6)]
    if not warmup_only:
        events += [{"ts": t + 5 + i, "stage": "train-scorer", "kind": "step", "step": i, "total_steps": 5,
                    "loss_upper": 7.0 - i / 10, "loss_lower": 6.5 - i / 10, "fraction": 0.25 + 0.15 * i}
                   for i in range(1, 6)]
    events.append({"ts": t + 11, "stage": "train-scorer", "kind": "done"})
    return events


def val_loss(tokens: float) -> float:
    return 9.0 - 2.0 * (tokens / (2 * STEPS_PER_ROUND * BATCH_TOKENS))


def pretrain_events(t: float, round_number: int, *, upto: int = STEPS_PER_ROUND, done: bool = True,
                    decay: bool = True, with_tokens: bool = True) -> list[dict]:
    """One round's pretraining: steps count from 0, ``tokens_seen`` from the rounds before."""
    before = round_number * STEPS_PER_ROUND * BATCH_TOKENS
    events = [{"ts": t, "stage": "pretrain", "kind": "start", "steps": STEPS_PER_ROUND, "start_step": 0,
               "global_batch_tokens": BATCH_TOKENS, "size": "tiny"}]
    for step in range(1, upto + 1):
        tokens = before + step * BATCH_TOKENS
        events.append({"ts": t + step, "stage": "pretrain", "kind": "step", "step": step,
                       "total_steps": STEPS_PER_ROUND, "loss": val_loss(tokens) + 0.3, "tokens_seen": tokens})
        if step % EVAL_EVERY == 0:
            evaluation = {"ts": t + step + 0.5, "stage": "pretrain", "kind": "eval", "step": step,
                          "loss_val": round(val_loss(tokens), 4)}
            if with_tokens:
                evaluation["tokens_seen"] = tokens
            events.append(evaluation)
    if decay and upto == STEPS_PER_ROUND:
        tokens = before + upto * BATCH_TOKENS
        events.append({"ts": t + upto + 1, "stage": "pretrain", "kind": "eval", "step": upto,
                       "tokens_seen": tokens, "loss_val": round(val_loss(tokens) - DECAY_GAIN, 4), "branch": "decay"})
    if done and upto == STEPS_PER_ROUND:
        events.append({"ts": t + upto + 2, "stage": "pretrain", "kind": "done", "steps": upto})
    return events


RESULT = {"rounds": [
    {"round": 0, "val_loss": 8.0, "tokens": 163840, "threshold": None, "drift_spearman": None,
     "composition": {"books": 0.5, "code": 0.3, "mail": 0.2}, "cost_cpu_s": 61.0},
    {"round": 1, "val_loss": 7.0, "tokens": 327680, "threshold": 0.42, "drift_spearman": 0.8125,
     "composition": {"books": 0.7, "code": 0.2, "mail": 0.1}, "cost_cpu_s": 95.5, "future_field": [1]},
]}


def write_experiment(root: Path, *, finished: bool = True, result: bool = True) -> Path:
    """A whole experiment; with ``finished=False`` it stops in round 1's pretraining, at step 20 of 40."""
    write_plan(root, timings={"r0-select": {"wall_s": 3.1, "cpu_s": 5.0}})
    append_events(root / "r0-select", select_events(T0))
    append_events(root / "r0-lm", pretrain_events(T0 + 10, 0))
    append_events(root / "r0-proxy", scorer_events(T0 + 60, warmup_only=True))
    append_events(root / "r1-scorer", scorer_events(T0 + 80, warmup_only=False))
    append_events(root / "r1-select", select_events(T0 + 100))
    append_events(root / "r1-lm", pretrain_events(T0 + 110, 1, upto=STEPS_PER_ROUND if finished else 20))
    if finished and result:
        write_json(root / "rounds-result.json", RESULT)
    return root
