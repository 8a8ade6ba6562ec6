"""Overhead of the pretraining loop against a bare forward/backward/step loop, same model and data.

Both loops run in this one process on the same packed tokens (the embedded sample), the same model
preset, micro-batch and gradient accumulation. The bare loop is what any training loop must do:
read a batch from the memory map, forward, cross-entropy, backward, AdamW step. The pretraining loop is
``engine.pretrain.train.train`` (data order, schedule, clipping, logging, events). Steady-state tokens/s
(the first ``--log-every`` steps are warm-up and are dropped) of each, interleaved over ``--repeats``
rounds; the best round of each is compared, by wall time and by this process's CPU time (which other
users of a shared machine disturb far less). Goal: overhead ≤ 10%.

    .venv/bin/python bench/bench_pretrain.py                # CPU: tiny, 256 tokens, 2 × 8 sequences a step
    .venv/bin/python bench/bench_pretrain.py --device cuda --size 160m --seq-len 2048 --micro-batch 16

Prints the figures and writes ``bench/results/pretrain.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimiser step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab-size", type=int, default=8192, help="of the BPE trained on the sample")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: CPU time is then a steady measure on a shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pretrain.json")
    return parser.parse_args()


def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds: CPU time of this process barely moves when others load the machine."""
    return time.perf_counter(), time.process_time()


def bare_loop(cfg, packed, vocab_size: int, steps: int, warmup_steps: int) -> tuple[float, float]:
    """(wall, CPU) tokens/s of forward/backward/step on the same sequences, after ``warmup_steps``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from engine.models.families import build_causal_lm

    device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
    model = build_causal_lm(cfg.model, vocab_size, seed=cfg.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    accum = cfg.grad_accum
    n_seq = packed.n_sequences(cfg.seq_len)
    position = 0
    start = None
    for step in range(steps):
        if step == warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clocks()
        for _ in range(accum):
            idx = [(position + i) % n_seq for i in range(cfg.micro_batch)]
            position += cfg.micro_batch
            rows = torch.from_numpy(np.stack([packed.sequence(i, cfg.seq_len) for i in idx]).astype(np.int64))
            rows = rows.to(device)
            with amp:
                logits = model(input_ids=rows[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
            (loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    float(loss.detach())  # wait for the device
    end = clocks()
    tokens = (steps - warmup_steps) * cfg.global_batch_tokens
    return tokens / (end[0] - start[0]), tokens / (end[1] - start[1])


def timed_train(cfg, run_root: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one whole ``engine.pretrain.train.train`` call in a fresh run directory."""
    from engine.pretrain.train import train

    for stale in ("checkpoints", "events.jsonl"):
        path = run_root / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    start = clocks()
    train(cfg, quiet=True)
    end = clocks()
    return end[0] - start[0], end[1] - start[1]


def trainer_loop(cfg, run_root: Path, warmup_steps: int) -> tuple[float, float]:
    """(wall, CPU) tokens/s of ``engine.pretrain.train.train`` in steady state.

    The difference of a ``steps``-step run and a ``warmup_steps``-step run: set-up (model build, data
    open), the final checkpoint and the first steps cancel, leaving exactly the steps the bare loop times.
    """
    import dataclasses

    short = timed_train(dataclasses.replace(cfg, steps=warmup_steps), run_root)
    full = timed_train(cfg, run_root)
    tokens = (cfg.steps - warmup_steps) * cfg.global_batch_tokens
    return tokens / (full[0] - short[0]), tokens / (full[1] - short[1])


def main() -> None:
    args = parse_args()
    import orjson
    import torch

    from engine.data.sample import sample_pool_glob
    from engine.models.families import count_parameters
    from engine.pretrain.launch import prepare_data, resolve_config
    from engine.run_dir import RunDir, atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    run = RunDir(work / "run")
    flags = {
        "data": (sample_pool_glob(),), "size": args.size, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "global_batch_tokens": args.seq_len * args.micro_batch * args.accum, "steps": args.steps,
        "log_every": args.log_every, "save_every": 10**9, "device": args.device, "world_size": 1,
    }
    cfg = resolve_config(flags, run, resume=False)
    # A BPE trained on the sample itself (the default when no tokenizer is given).
    from engine.data.sources import read_texts
    from engine.data.tokenizer import resolve_tokenizer, sample_for_training

    resolve_tokenizer(None, run.tokenizer_path, sample_for_training(read_texts(sample_pool_glob())),
                      vocab_size=args.vocab_size)
    t = time.perf_counter()
    packed, _ = prepare_data(cfg, run)
    pack_s = time.perf_counter() - t
    vocab = int(packed.header["vocab_size"])
    from engine.models.families import build_causal_lm

    params = count_parameters(build_causal_lm(cfg.model, vocab))
    print(f"model {args.size}: {params / 1e6:.1f}M params (vocab {vocab}); {cfg.global_batch_tokens:,} tokens/step "
          f"({args.micro_batch} × {args.seq_len} × {cfg.grad_accum}); {args.steps} steps; "
          f"device {args.device}, {torch.get_num_threads()} threads")
    print(f"packing the sample: {packed.n_tokens:,} tokens in {pack_s:.1f}s with worker processes")

    bare, trainer = [], []
    for r in range(args.repeats):
        bare.append(bare_loop(cfg, packed, vocab, args.steps, args.log_every))
        trainer.append(trainer_loop(cfg, run.root, args.log_every))
        print(f"round {r + 1}: bare {bare[-1][0]:,.0f} tok/s ({bare[-1][1]:,.0f} per CPU-s) · "
              f"pretrain loop {trainer[-1][0]:,.0f} tok/s ({trainer[-1][1]:,.0f} per CPU-s)")
    # Best round of each: the one least disturbed by other load on the machine.
    best_bare = [max(b[i] for b in bare) for i in (0, 1)]
    best_trainer = [max(t[i] for t in trainer) for i in (0, 1)]
    overhead_wall = 1 - best_trainer[0] / best_bare[0]
    overhead_cpu = 1 - best_trainer[1] / best_bare[1]
    print(f"best: bare {best_bare[0]:,.0f} tok/s · pretrain loop {best_trainer[0]:,.0f} tok/s · "
          f"overhead {overhead_wall:+.1%} wall, {overhead_cpu:+.1%} CPU time (goal ≤ 10%)")
    result = {
        "benchmark": "pretrain loop vs bare forward/backward/step",
        "size": args.size, "params": params, "vocab_size": vocab, "seq_len": args.seq_len,
        "micro_batch": args.micro_batch, "grad_accum": cfg.grad_accum, "steps": args.steps,
        "measured_after_step": args.log_every, "device": args.device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "load_average_at_end": list(os.getloadavg()),
        "pack_tokens": packed.n_tokens, "pack_seconds": round(pack_s, 2),
        "bare_tokens_per_s": [round(b[0], 1) for b in bare],
        "bare_tokens_per_cpu_s": [round(b[1], 1) for b in bare],
        "pretrain_tokens_per_s": [round(t[0], 1) for t in trainer],
        "pretrain_tokens_per_cpu_s": [round(t[1], 1) for t in trainer],
        "overhead_wall": round(overhead_wall, 4), "overhead_cpu": round(overhead_cpu, 4), "goal_overhead": 0.10,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    print(orjson.dumps(result).decode())
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
