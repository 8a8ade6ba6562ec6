"""Continuing a model (``pretrain --init-from``), the learning-rate schedules and the decayed evaluation
branch (``--decay-steps``): the building blocks of BLISS's rounds."""

from __future__ import annotations

import orjson
import pytest
import torch

from engine.data.tokenizer import train_bpe_tokenizer
from engine.errors import UserError
from engine.models.checkpoints import latest_checkpoint, list_checkpoints
from engine.models.torch_files import load_torch_file
from engine.pretrain.launch import prepare_data, resolve_config
from engine.pretrain.schedule import Schedule, decay_branch_multiplier
from engine.pretrain.train import train
from engine.run_dir import RunDir
from tests.conftest import make_records, write_shard


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("continue-data")
    first = write_shard(root / "first.jsonl.zst", make_records(120, seed=21))
    second = write_shard(root / "second.jsonl.zst", make_records(120, seed=22))
    val = write_shard(root / "val.jsonl", make_records(20, seed=23))
    return first, second, val


def prepared(root, data, val, **flags):
    run = RunDir(root)
    base = {"data": (str(data),), "val": str(val), "size": "tiny", "seq_len": 32, "global_batch_tokens": 256,
            "micro_batch": 4, "steps": 6, "log_every": 1, "save_every": 6, "eval_every": 3, "eval_tokens": 2048,
            "device": "cpu", "tensorboard": False, "threads": 1}
    cfg = resolve_config({**base, **flags}, run, resume=False)
    prepare_data(cfg, run, workers=1)
    return cfg


def events(root):
    return [orjson.loads(line) for line in (root / "events.jsonl").read_bytes().splitlines()]


def adam_step_count(checkpoint) -> int:
    state = load_torch_file(checkpoint / "optimizer.pt", what="optimiser")
    return int(next(iter(state["state"].values()))["step"])


# --- schedules ------------------------------------------------------------------------------------------


def test_constant_and_wsd_schedules_hold_the_peak_and_wsd_decays_over_its_last_fifth():
    constant = Schedule(100, 0.0, 0.1, "constant")
    assert [constant(s) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    wsd = Schedule(100, 0.1, 0.1, "wsd")
    assert wsd(0) == pytest.approx(0.1) and wsd(9) == pytest.approx(1.0)
    assert wsd(81) == 1.0  # stable until the last 18 steps (20% of the 90 after warm-up)
    assert wsd(82) < 1.0 and wsd(99) == pytest.approx(0.1)
    assert all(wsd(s) >= wsd(s + 1) for s in range(10, 99))
    with pytest.raises(UserError, match="--lr-schedule"):
        resolve_config({"data": ("x",), "lr_schedule": "linear", "size": "tiny"}, RunDir("/tmp/none"), resume=False)


def test_the_decay_branch_falls_linearly_from_where_the_main_line_ended():
    rates = [decay_branch_multiplier(s, decay_steps=4, start=0.5, min_ratio=0.1) for s in range(4)]
    assert rates == pytest.approx([0.5 * (1 - 0.9 * k / 4) for k in (1, 2, 3, 4)])
    assert rates[-1] == pytest.approx(0.05)


# --- --init-from ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def round0(tmp_path_factory, corpus_files, small_tokenizer):
    first, _, val = corpus_files
    root = tmp_path_factory.mktemp("round0") / "r0"
    cfg = prepared(root, first, val, tokenizer=str(small_tokenizer), lr_schedule="constant", lr=5e-3, steps=12,
                   save_every=12)
    result = train(cfg, quiet=True)
    return root, result


def test_a_continued_model_starts_from_the_checkpoint_with_its_optimiser_and_counts_all_its_tokens(
        tmp_path, corpus_files, round0):
    r0, r0_result = round0
    _, second, val = corpus_files
    fresh = train(prepared(tmp_path / "fresh", second, val, tokenizer=str(r0 / "tokenizer.json")), quiet=True)
    cfg = prepared(tmp_path / "r1", second, val, init_from=str(r0), lr_schedule="constant", warmup_frac=0.0,
                   lr=5e-4)
    assert cfg.size == "tiny" and cfg.init_from == str(latest_checkpoint(r0 / "checkpoints"))
    result = train(cfg, quiet=True)

    # It goes on from round 0's weights: its first loss is near round 0's last, far below a fresh model's.
    assert result.losses[1] < fresh.losses[1] - 0.5
    assert abs(result.losses[1] - r0_result.losses[12]) < 0.5
    # AdamW's moments came along: the step count goes on from round 0's twelve.
    assert adam_step_count(latest_checkpoint(tmp_path / "r1" / "checkpoints")) == 18
    # Tokens count the model's whole training, so consecutive rounds' curves join up.
    evals = [e for e in events(tmp_path / "r1") if e["kind"] == "eval"]
    assert [e["tokens_seen"] for e in evals] == [(12 + 3) * 256, (12 + 6) * 256]
    meta = orjson.loads((latest_checkpoint(tmp_path / "r1" / "checkpoints") / "meta.json").read_bytes())
    assert meta["tokens_seen"] == 18 * 256
    lrs = {e["step"]: e["lr"] for e in events(tmp_path / "r1") if e["kind"] == "step"}
    assert set(lrs.values()) == {5e-4}  # constant, no warm-up


def test_reset_optimizer_starts_adamw_afresh(tmp_path, corpus_files, round0):
    r0, _ = round0
    _, second, val = corpus_files
    cfg = prepared(tmp_path / "r1", second, val, init_from=str(r0), reset_optimizer=True, steps=2, save_every=2)
    train(cfg, quiet=True)
    assert adam_step_count(latest_checkpoint(tmp_path / "r1" / "checkpoints")) == 2


def test_init_from_refuses_what_cannot_fit_in_one_line(tmp_path, corpus_files, round0):
    r0, _ = round0
    _, second, val = corpus_files
    with pytest.raises(UserError, match="checkpoint not found"):
        prepared(tmp_path / "a", second, val, init_from=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="--size 14m differs from the --init-from model"):
        prepared(tmp_path / "b", second, val, init_from=str(r0), size="14m")
    other = tmp_path / "other-tokenizer.json"
    other.write_text(train_bpe_tokenizer([r["text"] for r in make_records(200, seed=5)], vocab_size=600).to_str())
    with pytest.raises(UserError, match="not the one the --init-from model was trained with"):
        prepared(tmp_path / "c", second, val, init_from=str(r0), tokenizer=str(other))
    with pytest.raises(UserError, match="--reset-optimizer"):
        prepared(tmp_path / "d", second, val, reset_optimizer=True)


# --- --decay-steps --------------------------------------------------------------------------------------


def test_the_decay_branch_is_evaluated_and_saved_beside_an_untouched_main_line(tmp_path, corpus_files, round0):
    r0, _ = round0
    _, second, val = corpus_files
    cfg = prepared(tmp_path / "run", second, val, init_from=str(r0), lr_schedule="constant", warmup_frac=0.0,
                   steps=4, save_every=4, decay_steps=3)
    result = train(cfg, quiet=True)
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_000004"]
    decayed = latest_checkpoint(run / "decayed" / "checkpoints")
    assert decayed.name == "step_000007" and (decayed / "tokenizer.json").exists()
    main_weights = load_torch_file(run / "checkpoints" / "step_000004" / "model.pt", what="m")
    branch_weights = load_torch_file(decayed / "model.pt", what="m")
    assert any(not torch.equal(main_weights[k], branch_weights[k]) for k in main_weights)

    log = events(run)
    branch = [e for e in log if e["kind"] == "eval" and e.get("branch") == "decay"]
    assert len(branch) == 1 and branch[0]["step"] == 7 and branch[0]["tokens_seen"] == (12 + 7) * 256
    assert log[-1]["kind"] == "done" and log[-1]["decayed_loss_val"] == branch[0]["loss_val"]
    main_evals = [e for e in log if e["kind"] == "eval" and "branch" not in e]
    assert main_evals[-1]["loss_val"] == result.loss_val != branch[0]["loss_val"]

    # Killed inside the branch (simulated: the branch's files are gone, no ``done``): --resume redoes it
    # from the main line's last checkpoint, to the same weights.
    import shutil

    shutil.rmtree(run / "decayed")
    train(cfg, resume=True, quiet=True)
    again = load_torch_file(latest_checkpoint(run / "decayed" / "checkpoints") / "model.pt", what="m")
    assert all(torch.equal(branch_weights[k], again[k]) for k in branch_weights)
