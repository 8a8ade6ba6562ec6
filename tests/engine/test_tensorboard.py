"""TensorBoard files beside events.jsonl: the same scalars, readable by tensorboard's own event reader."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from engine.pretrain.launch import prepare_data, resolve_config
from engine.pretrain.train import train
from engine.run_dir import RunDir
from tests.conftest import make_records, write_shard


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under ``folder``, read with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(orjson.loads, (run / "events.jsonl").read_bytes().splitlines()) if e["kind"] == kind]


def pretrain_run(tmp_path, tokenizer, **flags) -> RunDir:
    run = RunDir(tmp_path / "run")
    shard = write_shard(tmp_path / "train.jsonl.zst", make_records(200, seed=11))
    val = write_shard(tmp_path / "val.jsonl", make_records(20, seed=12))
    config = resolve_config({"data": (str(shard),), "val": str(val), "tokenizer": str(tokenizer), "size": "tiny",
                             "seq_len": 32, "global_batch_tokens": 256, "micro_batch": 4, "steps": 6, "log_every": 1,
                             "save_every": 6, "eval_every": 3, "eval_tokens": 1024, "device": "cpu", **flags},
                            run, resume=False)
    prepare_data(config, run, workers=1)
    train(config, quiet=True)
    return run


def test_pretrain_writes_the_event_logs_scalars_to_tensorboard(tmp_path, small_tokenizer):
    run = pretrain_run(tmp_path, small_tokenizer)
    logged = scalars(run.tensorboard / "pretrain")
    steps = events(run.root, "step")
    assert len(steps) == 6
    for name in ("loss", "lr", "tokens_per_s"):
        assert logged[f"pretrain/{name}"] == pytest.approx({e["step"]: e[name] for e in steps}, rel=1e-6)
    evals = events(run.root, "eval")
    assert logged["pretrain/eval/loss_val"] == pytest.approx({e["step"]: e["loss_val"] for e in evals}, rel=1e-6)
    assert sorted(logged["pretrain/eval/loss_val"]) == [3, 6]


def test_no_tensorboard_writes_none(tmp_path, small_tokenizer):
    run = pretrain_run(tmp_path, small_tokenizer, tensorboard=False)
    assert not run.tensorboard.exists() and events(run.root, "done")


def test_train_scorer_writes_its_step_figures_to_tensorboard(tmp_path, small_tokenizer):
    from engine.bliss.config import TrainScorerConfig
    from engine.bliss.train import run_train_scorer

    pool = write_shard(tmp_path / "pool.jsonl", make_records(120, seed=3))
    val = write_shard(tmp_path / "val.jsonl", make_records(20, seed=4))
    run = RunDir(tmp_path / "scorer")
    run_train_scorer(TrainScorerConfig(train=(str(pool),), val=str(val), tokenizer=str(small_tokenizer), proxy="tiny",
                                       steps=3, warmup_steps=2, inner_steps=1, seq_len=16, batch_size=4,
                                       val_batch_size=4, probe_docs=8, device="cpu"), run)
    logged = scalars(run.tensorboard / "train-scorer")
    outer = events(run.root, "step")
    for name in ("loss_lower", "loss_upper", "hypergrad_norm", "weight_entropy"):
        assert logged[f"train-scorer/{name}"] == pytest.approx({e["step"]: e[name] for e in outer}, rel=1e-6)
    warmup = events(run.root, "warmup")
    assert logged["train-scorer/warmup/loss"] == pytest.approx({e["step"]: e["loss"] for e in warmup}, rel=1e-6)
