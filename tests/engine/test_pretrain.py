"""The pretraining loop: config checks, schedule, data order, exact resume, checkpoints, evaluation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import orjson
import pytest

from engine.errors import UserError
from engine.eval.evaluate import eval_windows, evaluate_checkpoint
from engine.models.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    load_pretrained_model,
    resolve_checkpoint,
)
from engine.models.families import build_causal_lm
from engine.models.presets import ModelConfig, model_preset
from engine.pretrain.config import PretrainConfig, preset_training_defaults
from engine.pretrain.launch import prepare_data, resolve_config
from engine.pretrain.order import SequenceOrder, micro_batch_start
from engine.pretrain.parallel import transformer_blocks
from engine.pretrain.schedule import lr_multiplier, warmup_steps
from engine.pretrain.throughput import flops_per_token, model_flops_utilisation, peak_flops
from engine.pretrain.train import train
from engine.run_dir import RunDir
from tests.conftest import make_records, write_shard


def config(**overrides) -> PretrainConfig:
    base = dict(run_dir="runs/x", size="tiny", data=("d",), seq_len=32, lr=1e-3, global_batch_tokens=256,
                micro_batch=4, steps=10)
    return PretrainConfig(**{**base, **overrides})


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"steps": 0}, "--steps"),
        ({"size": "5b"}, "--size"),
        ({"micro_batch": 3}, "--micro-batch"),
        ({"global_batch_tokens": 100}, "--global-batch-tokens"),
        ({"lr": -1.0}, "--lr"),
        ({"data": ()}, "--data"),
        ({"steps": None, "tokens": 0}, "--tokens"),
        ({"device": "tpu"}, "--device"),
        ({"world_size": 3}, "--micro-batch"),
    ],
)
def test_bad_settings_name_the_flag_to_fix(overrides, flag):
    with pytest.raises(UserError, match=flag):
        config(**overrides)


def test_gradient_accumulation_makes_up_the_global_batch():
    cfg = config(global_batch_tokens=32 * 64, micro_batch=4, world_size=2)  # 64 sequences a step
    assert cfg.batch_sequences == 64
    assert cfg.grad_accum == 8  # 4 sequences × 2 ranks × 8 micro-batches = 64


def test_steps_come_from_tokens_or_one_epoch_of_the_data():
    assert config(steps=None, tokens=1000).total_steps(10**6) == 4  # ceil(1000 / 256)
    assert config(steps=None).total_steps(2560) == 10  # one epoch
    assert config(steps=7).total_steps(10**9) == 7


def test_presets_follow_the_pythia_suite_and_shard_from_1b_up():
    assert preset_training_defaults("410m", 2048) == {
        "lr": 3e-4, "global_batch_tokens": 1024 * 2048, "micro_batch": 16, "fsdp": False,
    }
    assert preset_training_defaults("1b", 2048)["fsdp"] is True
    assert preset_training_defaults("2.8b", 2048)["lr"] == 1.6e-4
    assert preset_training_defaults("tiny", 64)["global_batch_tokens"] == 32 * 64  # batch kept in sequences


# --- pure pieces --------------------------------------------------------------------------------------


def test_learning_rate_warms_up_for_one_percent_then_decays_to_ten_percent():
    total = 1000
    warm = warmup_steps(total, 0.01)
    assert warm == 10
    assert lr_multiplier(0, total_steps=total, warmup=warm) == pytest.approx(0.1)
    assert lr_multiplier(9, total_steps=total, warmup=warm) == pytest.approx(1.0)
    assert lr_multiplier(10, total_steps=total, warmup=warm) == pytest.approx(1.0)
    assert lr_multiplier(505, total_steps=total, warmup=warm) == pytest.approx(0.55, abs=1e-3)
    assert lr_multiplier(total, total_steps=total, warmup=warm) == pytest.approx(0.1)


def test_data_order_is_a_seeded_permutation_per_epoch_and_ranks_never_overlap():
    order = SequenceOrder(10, seed=3)
    epoch0, epoch1 = order.indices(0, 10), order.indices(10, 10)
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert list(epoch0) != list(epoch1)
    assert list(SequenceOrder(10, seed=3).indices(5, 10)) == list(order.indices(5, 10))  # resumable anywhere

    # 2 ranks × 2 micro-batches × 3 sequences = 12 sequences a step, each position read exactly once
    starts = [micro_batch_start(4, m, rank=r, world_size=2, micro_batch=3, batch_sequences=12)
              for m in range(2) for r in range(2)]
    positions = sorted(p for s in starts for p in range(s, s + 3))
    assert positions == list(range(48, 60))


def test_mfu_uses_6n_plus_attention_flops_against_the_device_peak():
    cfg = model_preset("410m")
    assert flops_per_token(cfg, 300_000_000, 2048) == 6 * 300e6 + 12 * 24 * 1024 * 2048
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some CPU") is None
    assert model_flops_utilisation(100_000, 2e9, 1e15, 2) == pytest.approx(0.1)


def test_fsdp_units_are_the_transformer_blocks_of_pythia_and_llama():
    pythia = build_causal_lm(model_preset("tiny"), 512)
    assert len(transformer_blocks(pythia)) == 2
    llama = build_causal_lm(ModelConfig(name="l", family="llama", n_layers=3, d_model=64, n_heads=4), 512)
    assert len(transformer_blocks(llama)) == 3


def test_eval_windows_predict_every_token_once():
    windows = eval_windows(21, 8)
    assert windows == [(0, 8), (8, 8), (16, 4)]
    assert sum(length for _, length in windows) == 20


# --- training end to end, in-process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-data")
    train_shard = write_shard(root / "train.jsonl.zst", make_records(200, seed=11))
    val_shard = write_shard(root / "val.jsonl", make_records(20, seed=12))
    return train_shard, val_shard


def prepared_run(tmp_path, corpus_files, tokenizer, **flags) -> PretrainConfig:
    train_shard, val_shard = corpus_files
    run = RunDir(tmp_path / "run")
    base = {"data": (str(train_shard),), "val": str(val_shard), "tokenizer": str(tokenizer), "size": "tiny",
            "seq_len": 32, "global_batch_tokens": 256, "micro_batch": 4, "steps": 10, "log_every": 1,
            "save_every": 5, "eval_every": 5, "eval_tokens": 2048, "device": "cpu"}
    cfg = resolve_config({**base, **flags}, run, resume=False)
    prepare_data(cfg, run, workers=1)
    return cfg


def step_losses(run_root) -> dict[int, float]:
    losses = {}
    for line in (run_root / "events.jsonl").read_bytes().splitlines():
        event = orjson.loads(line)
        if event["kind"] == "step":
            losses[event["step"]] = event["loss"]
    return losses


def test_resuming_from_a_checkpoint_gives_exactly_the_same_losses(tmp_path, corpus_files, small_tokenizer):
    straight = prepared_run(tmp_path / "a", corpus_files, small_tokenizer)
    result = train(straight, quiet=True)
    assert result.steps == 10 and len(result.losses) == 10

    split = prepared_run(tmp_path / "b", corpus_files, small_tokenizer)
    first = train(split, stop_after=5, quiet=True)
    assert first.steps == 5 and first.checkpoint.name == "step_000005"
    second = train(split, resume=True, quiet=True)
    assert second.steps == 10

    losses_a, losses_b = step_losses(tmp_path / "a" / "run"), step_losses(tmp_path / "b" / "run")
    assert list(losses_b) == list(range(1, 11))
    assert [losses_b[s] for s in range(1, 11)] == [losses_a[s] for s in range(1, 11)]
    assert result.loss_val == second.loss_val
    assert losses_a[10] < losses_a[1]  # it learns

    events = [orjson.loads(line) for line in (tmp_path / "b" / "run" / "events.jsonl").read_bytes().splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds.count("start") == 2 and kinds[-1] == "done"
    done = events[-1]
    assert done["steps"] == 10 and done["tokens_seen"] == 10 * 256 and done["loss_val"] == second.loss_val
    step = next(e for e in events if e["kind"] == "step")
    assert {"step", "total_steps", "loss", "lr", "tokens_per_s", "tokens_seen"} <= set(step)
    assert "mfu" not in step  # MFU is reported on CUDA only

    # Not resuming a run that has checkpoints would silently throw them away: refused.
    with pytest.raises(UserError, match="--resume"):
        train(split, quiet=True)


def test_checkpoints_keep_the_last_few_and_load_as_a_plain_model(tmp_path, corpus_files, small_tokenizer):
    cfg = prepared_run(tmp_path, corpus_files, small_tokenizer, steps=6, save_every=2, keep=2, val=None)
    train(cfg, quiet=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_000004", "step_000006"]
    assert latest_checkpoint(checkpoints).name == "step_000006"
    assert resolve_checkpoint(tmp_path / "run") == checkpoints / "step_000006"
    assert not list(checkpoints.glob(".*tmp"))

    model, tokenizer_path = load_pretrained_model(tmp_path / "run")
    assert tokenizer_path.read_bytes() == (tmp_path / "run" / "tokenizer.json").read_bytes()
    assert type(model).__name__ == "GPTNeoXForCausalLM" and not model.training
    with pytest.raises(UserError, match="checkpoint"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_evaluating_a_checkpoint_reports_loss_perplexity_and_bits_per_byte(tmp_path, corpus_files, small_tokenizer):
    cfg = prepared_run(tmp_path, corpus_files, small_tokenizer, steps=4, save_every=4)
    result = train(cfg, quiet=True)
    evaluated, folder = evaluate_checkpoint(tmp_path / "run", corpus_files[1], batch_size=16, device="cpu")
    assert folder.name == "step_000004"
    assert evaluated.perplexity == pytest.approx(math.exp(evaluated.loss))
    texts_bytes = sum(len(r["text"].encode()) for r in make_records(20, seed=12))
    assert evaluated.bytes == texts_bytes
    assert evaluated.bits_per_byte == pytest.approx(evaluated.loss * evaluated.tokens / (math.log(2) * texts_bytes))
    # the whole val set (2,048 tokens cap in training aside) gives about the in-training loss
    assert evaluated.loss == pytest.approx(result.loss_val, rel=0.05)
    assert np.isfinite(evaluated.loss) and evaluated.loss < math.log(1024) + 1


def test_config_round_trips_through_the_frozen_file(tmp_path, corpus_files, small_tokenizer):
    from engine.pretrain.launch import read_frozen_config, write_frozen_config

    cfg = prepared_run(tmp_path, corpus_files, small_tokenizer)
    path = write_frozen_config(RunDir(tmp_path / "run"), cfg)
    assert read_frozen_config(path) == cfg
    recorded = orjson.loads((tmp_path / "run" / "config.json").read_bytes())
    assert recorded["pretrain"]["size"] == "tiny" and recorded["pretrain"]["seed"] == 0
    assert dataclasses.replace(cfg, steps=None).total_steps(10**6) == 10**6 // 256


def test_resuming_with_more_steps_follows_the_longer_schedule(tmp_path, corpus_files, small_tokenizer):
    cfg = prepared_run(tmp_path, corpus_files, small_tokenizer, steps=4, save_every=4, val=None)
    train(cfg, quiet=True)
    longer = dataclasses.replace(cfg, steps=8)
    result = train(longer, resume=True, quiet=True)
    assert result.steps == 8 and list(result.losses) == [5, 6, 7, 8]
    events = [orjson.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_bytes().splitlines()]
    lrs = {e["step"]: e["lr"] for e in events if e["kind"] == "step"}
    # the lr logged at step s is the one its update used: multiplier of optimiser step s - 1
    assert lrs[5] == pytest.approx(1e-3 * lr_multiplier(4, total_steps=8, warmup=1))
    assert lrs[8] == pytest.approx(1e-3 * lr_multiplier(7, total_steps=8, warmup=1))
