"""``blissctl pretrain`` and ``blissctl eval`` as a user runs them: torchrun on 2 CPU ranks, the
--dry-run command line, one-line errors, Ctrl-C forwarding."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from blissctl.cli import app
from engine.data.sample import sample_pool_glob, sample_val_path
from tests.conftest import make_records, write_shard

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def events_of(run_root: Path) -> list[dict]:
    return [orjson.loads(line) for line in (run_root / "events.jsonl").read_bytes().splitlines()]


def test_two_process_torchrun_pretrain_on_the_embedded_sample_then_eval(tmp_path, small_tokenizer):
    args = [
        sys.executable, "-m", "blissctl", "pretrain", "--data", sample_pool_glob(), "--val", str(sample_val_path()),
        "--tokenizer", str(small_tokenizer), "--size", "tiny", "--seq-len", "64", "--global-batch-tokens", "2048",
        "--micro-batch", "8", "--steps", "4", "--save-every", "2", "--eval-every", "2", "--eval-tokens", "4096",
        "--log-every", "1", "--nproc-per-node", "2", "--device", "cpu", "--runs-dir", str(tmp_path), "--run", "ddp",
    ]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--nproc-per-node 2 -m engine.pretrain.worker" in done.stdout
    run = tmp_path / "ddp"
    events = events_of(run)
    start = next(e for e in events if e["kind"] == "start")
    assert start["world_size"] == 2 and start["grad_accum"] == 2  # 32 sequences = 8 × 2 ranks × 2
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3, 4]
    assert [e["step"] for e in events if e["kind"] == "eval"] == [2, 4]
    assert events[-1]["kind"] == "done" and events[-1]["tokens_seen"] == 4 * 2048
    assert all(e["stage"] == "pretrain" for e in events)  # one writer (rank 0), not one per rank
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    header = orjson.loads((run / "data" / "train.json").read_bytes())
    assert header["n_documents"] == 9600 and header["dtype"] == "uint16"

    val = write_shard(tmp_path / "heldout.jsonl", make_records(20, seed=7))
    import torch

    threads_before = torch.get_num_threads()
    try:
        result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--val", str(val), "--batch", "16",
                                     "--threads", "1"])
        assert torch.get_num_threads() == 1  # eval ran on the one thread asked for (the demo's arms side by side)
    finally:
        torch.set_num_threads(threads_before)
    assert result.exit_code == 0, result.output
    assert "bits per byte" in result.output and "perplexity" in result.output
    assert "torch threads: 1 (--threads)" in result.output
    evaluation = events_of(run)[-1]
    assert evaluation["stage"] == "eval" and evaluation["kind"] == "eval"
    assert evaluation["checkpoint"].endswith("step_000004")
    assert {"loss_val", "perplexity", "bits_per_byte"} <= set(evaluation)


def test_dry_run_prints_the_multi_node_torchrun_command_and_writes_nothing(tmp_path):
    result = runner.invoke(app, [
        "pretrain", "--data", sample_pool_glob(), "--size", "1b", "--nnodes", "2", "--nproc-per-node", "8",
        "--rdzv-endpoint", "node0:29500", "--runs-dir", str(tmp_path), "--run", "big", "--dry-run",
    ])
    assert result.exit_code == 0, result.output
    command = next(line for line in result.output.splitlines() if "engine.pretrain.worker" in line)
    argv = shlex.split(command)
    assert Path(argv[0]).name == "torchrun"
    joined = " ".join(argv[1:])
    assert "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint node0:29500 --rdzv-id blissctl-big" in joined
    assert "--nproc-per-node 8 -m engine.pretrain.worker --config" in joined
    assert argv[-1] == str(tmp_path / "big" / "pretrain_config.json")
    assert "FSDP" in result.output and "16 process(es)" in result.output  # 1b shards by default
    assert "lr 0.0003" in result.output and "2,097,152 tokens/step" in result.output  # the Pythia preset
    assert not (tmp_path / "big").exists()


def test_dry_run_with_a_fixed_node_rank_uses_static_rendezvous(tmp_path):
    result = runner.invoke(app, [
        "pretrain", "--data", sample_pool_glob(), "--size", "410m", "--nnodes", "2", "--node-rank", "1",
        "--nproc-per-node", "4", "--rdzv-endpoint", "10.0.0.1:29500", "--runs-dir", str(tmp_path), "--dry-run",
    ])
    assert result.exit_code == 0, result.output
    assert "--node-rank 1 --rdzv-backend static --rdzv-endpoint 10.0.0.1:29500" in result.output
    assert "DDP" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "5b"], "unknown model size '5b'"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--micro-batch", "3", "--seq-len", "64", "--global-batch-tokens", "2048"], "--micro-batch 3"),
        (["--global-batch-tokens", "1000"], "not a multiple of --seq-len"),
        (["--nnodes", "2"], "needs --rdzv-endpoint"),
        (["--steps", "5", "--tokens", "100"], "--steps or --tokens"),
        (["--data", "/no/such/shards/*.jsonl"], "no input files match"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
    data = [] if "--data" in args else ["--data", sample_pool_glob()]
    result = runner.invoke(app, ["pretrain", *data, "--runs-dir", str(tmp_path), *args, "--dry-run"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_missing_data_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["pretrain", "--size", "tiny", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--data is required" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_refuses_settings_that_would_change_the_run(tmp_path):
    from engine.pretrain.launch import resolve_config, write_frozen_config
    from engine.run_dir import RunDir

    run = RunDir(tmp_path / "r")
    flags = {"data": (sample_pool_glob(),), "size": "tiny", "seq_len": 64, "steps": 10, "world_size": 1}
    write_frozen_config(run, resolve_config(flags, run, resume=False))
    base = ["pretrain", "--runs-dir", str(tmp_path), "--run", "r", "--resume", "--dry-run"]
    refused = runner.invoke(app, [*base, "--lr", "0.5"])
    assert refused.exit_code == 2 and "--lr 0.5 differs from the run being resumed" in refused.stderr
    longer = runner.invoke(app, [*base, "--steps", "20", "--nproc-per-node", "2", "--micro-batch", "16"])
    assert longer.exit_code == 0, longer.output
    assert "steps 20" in longer.output and "--resume" in longer.output and "seq 64" in longer.output
    uneven = runner.invoke(app, [*base, "--nproc-per-node", "2"])  # the saved micro-batch of 32 no longer fits
    assert uneven.exit_code == 2 and "--micro-batch 32 × 2 process(es) does not divide" in uneven.stderr


def test_eval_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "none"), "--val", "x.jsonl"])
    assert result.exit_code == 2 and "checkpoint not found" in result.stderr
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 2 and "--checkpoint is required" in result.stderr
    result = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "none"), "--threads", "0"])
    assert result.exit_code == 2 and "--threads must be at least 1" in result.stderr


def test_select_output_brings_its_tokenizer(tmp_path, small_tokenizer):
    from engine.pretrain.launch import resolve_config, resolve_run_tokenizer
    from engine.run_dir import RunDir

    selected = tmp_path / "runs" / "sel" / "selected"
    write_shard(selected / "part-00000.jsonl.zst", make_records(5))
    (selected / "manifest.json").write_text("{}")
    (tmp_path / "runs" / "sel" / "tokenizer.json").write_bytes(small_tokenizer.read_bytes())
    run = RunDir(tmp_path / "runs" / "pt")
    cfg = resolve_config({"data": (str(selected),), "size": "tiny", "seq_len": 64, "world_size": 1}, run,
                         resume=False)
    path = resolve_run_tokenizer(cfg, run)
    assert path == run.tokenizer_path and path.read_bytes() == small_tokenizer.read_bytes()


def test_ctrl_c_is_forwarded_to_torchrun_once_and_reported(tmp_path):
    from engine.pretrain.launch import run_forwarding_signals

    marker = tmp_path / "got-sigint"
    child = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGINT, lambda *a: (pathlib.Path(sys.argv[1]).write_text('yes'), sys.exit(130)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_forwarding_signals([sys.executable, "-c", child, str(marker)])
    finally:
        timer.cancel()
    assert marker.read_text() == "yes"


@pytest.mark.slow
def test_fsdp_on_two_ranks_stops_resumes_and_matches_a_single_process_run(tmp_path, small_tokenizer):
    shard = write_shard(tmp_path / "train.jsonl.zst", make_records(300, seed=21))
    common = ["--data", str(shard), "--tokenizer", str(small_tokenizer), "--size", "tiny", "--seq-len", "32",
              "--global-batch-tokens", "512", "--micro-batch", "8", "--steps", "4", "--log-every", "1",
              "--device", "cpu", "--runs-dir", str(tmp_path)]
    sharded = [sys.executable, "-m", "blissctl", "pretrain", *common, "--run", "fsdp", "--fsdp",
               "--nproc-per-node", "2"]
    first = subprocess.run([*sharded, "--stop-after", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "continue with --resume" in first.stdout
    second = subprocess.run([*sharded, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout

    # The same 4 steps in one process (2 micro-batches instead of 2 ranks read the same sequences).
    from engine.pretrain.launch import prepare_data, resolve_config
    from engine.pretrain.train import train
    from engine.run_dir import RunDir

    run = RunDir(tmp_path / "single")
    flags = {"data": (str(shard),), "tokenizer": str(small_tokenizer), "size": "tiny", "seq_len": 32,
             "global_batch_tokens": 512, "micro_batch": 8, "steps": 4, "log_every": 1, "device": "cpu",
             "world_size": 1}
    cfg = resolve_config(flags, run, resume=False)
    prepare_data(cfg, run, workers=1)
    single = train(cfg, quiet=True)

    events = events_of(tmp_path / "fsdp")
    starts = [e for e in events if e["kind"] == "start"]
    assert [s["fsdp"] for s in starts] == [True, True] and [s["start_step"] for s in starts] == [0, 2]
    sharded_losses = {e["step"]: e["loss"] for e in events if e["kind"] == "step"}
    assert list(sharded_losses) == [1, 2, 3, 4]
    for step, loss in single.losses.items():
        assert sharded_losses[step] == pytest.approx(loss, rel=1e-4)


def test_without_a_tokenizer_one_is_trained_on_the_data_and_saved_in_the_run(tmp_path):
    from tokenizers import Tokenizer

    from engine.pretrain.launch import resolve_config, resolve_run_tokenizer
    from engine.run_dir import RunDir

    shard = write_shard(tmp_path / "train.jsonl", make_records(200, seed=4))
    run = RunDir(tmp_path / "runs" / "pt")
    cfg = resolve_config({"data": (str(shard),), "size": "tiny", "seq_len": 64, "world_size": 1}, run, resume=False)
    path = resolve_run_tokenizer(cfg, run)
    assert path == run.tokenizer_path
    assert Tokenizer.from_file(str(path)).token_to_id("<|endoftext|>") == 0
