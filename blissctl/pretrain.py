"""Pretrain a Pythia-family model (or LLaMA-0.5B) from scratch on a selected subset, under torchrun.

Tokenises --data once into packed sequences in the run directory, freezes the config, then runs
`torchrun ... -m engine.pretrain.worker` (DDP; FSDP with --fsdp, the default from 1b up; one DDP
process on one machine starts `python -m engine.pretrain.worker` directly). Checkpoints
every --save-every steps; --resume continues exactly where the last one left off.

Example: blissctl pretrain --data runs/c4-bliss/selected --size 410m --nproc-per-node 8 --run pythia-410m

Example (continue a model on a new subset at a constant rate, with a decayed evaluation branch):
blissctl pretrain --init-from runs/round0-lm --data runs/round1-select/selected --lr-schedule constant --lr 5e-4 --warmup 0 --steps 2000 --decay-steps 200 --run round1-lm
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blissctl.common import console, handles_user_errors

Opt = typer.Option


@handles_user_errors
def pretrain_command(
    data: Annotated[list[str] | None, Opt("--data", metavar="PATH", help="A select output (runs/NAME/selected, a Megatron one too) or JSONL/parquet shards: file, folder or glob; repeatable. A Megatron/GPT-NeoX dataset: its PREFIX (PREFIX.bin + PREFIX.idx), e.g. --data runs/NAME/selected/subset_text_document.")] = None,  # noqa: E501
    run: Annotated[str, Opt("--run", help="Run name: everything goes to RUNS_DIR/RUN.")] = "pretrain",
    runs_dir: Annotated[Path, Opt("--runs-dir", help="Folder holding the runs.")] = Path("runs"),
    size: Annotated[str | None, Opt("--size", help="Model preset: tiny, 14m, 31m, 70m, 160m, 410m, 1b, 1.4b, 2.8b, llama-0.5b. Default: 160m.")] = None,  # noqa: E501
    val: Annotated[str | None, Opt("--val", help="Held-out documents for the validation loss.")] = None,
    tokenizer: Annotated[str | None, Opt("--tokenizer", help="tokenizer.json (default: the select run's, else trained on --data).")] = None,  # noqa: E501
    seq_len: Annotated[int | None, Opt("--seq-len", help="Tokens per sequence. Default: 2048.")] = None,
    lr: Annotated[float | None, Opt("--lr", help="Peak learning rate. Default: the preset's Pythia value.")] = None,
    global_batch_tokens: Annotated[int | None, Opt("--global-batch-tokens", help="Tokens per optimiser step over all processes. Default: 1024 sequences.")] = None,  # noqa: E501
    micro_batch: Annotated[int | None, Opt("--micro-batch", help="Sequences per process per forward pass. Default: per preset.")] = None,  # noqa: E501
    steps: Annotated[int | None, Opt("--steps", help="Optimiser steps. Default: one epoch of --data.")] = None,
    tokens: Annotated[int | None, Opt("--tokens", help="Training tokens instead of --steps.")] = None,
    warmup: Annotated[float | None, Opt("--warmup", help="Warm-up fraction of the steps. Default: 0.01.")] = None,
    lr_schedule: Annotated[str | None, Opt("--lr-schedule", help="cosine (Pythia: to 10% of the peak), constant, or wsd (warm-up, stable, decay over the last 20%). Default: cosine.")] = None,  # noqa: E501
    decay_steps: Annotated[int | None, Opt("--decay-steps", help="After the last step, N more steps at a linearly falling rate on a side branch (RUNS_DIR/RUN/decayed), evaluated there; the main line stays undecayed. Default: 0.")] = None,  # noqa: E501
    init_from: Annotated[str | None, Opt("--init-from", metavar="CKPT|RUN", help="Start from this pretrain checkpoint (or run's latest): its weights and AdamW state; --size, --seq-len and the tokenizer follow it.")] = None,  # noqa: E501
    reset_optimizer: Annotated[bool | None, Opt("--reset-optimizer", help="With --init-from: fresh AdamW moments instead of the checkpoint's.")] = None,  # noqa: E501
    seed: Annotated[int | None, Opt("--seed", help="Seed of the initialisation and data order. Default: 0.")] = None,
    save_every: Annotated[int | None, Opt("--save-every", help="Checkpoint every N steps. Default: 1000.")] = None,
    keep: Annotated[int | None, Opt("--keep", help="Checkpoints kept. Default: 3.")] = None,
    eval_every: Annotated[int | None, Opt("--eval-every", help="Validation loss every N steps. Default: 1000.")] = None,  # noqa: E501
    eval_tokens: Annotated[int | None, Opt("--eval-tokens", help="Validation tokens per evaluation. Default: 1048576.")] = None,  # noqa: E501
    log_every: Annotated[int | None, Opt("--log-every", help="A step event every N steps. Default: 10.")] = None,
    fsdp: Annotated[bool | None, Opt("--fsdp/--no-fsdp", help="Shard with FSDP instead of DDP. Default: on from 1b up.")] = None,  # noqa: E501
    compile_model: Annotated[bool | None, Opt("--compile/--no-compile", help="torch.compile the transformer blocks.")] = None,  # noqa: E501
    device: Annotated[str | None, Opt("--device", help="auto, cuda or cpu. Default: auto.")] = None,
    tensorboard: Annotated[bool | None, Opt("--tensorboard/--no-tensorboard", help="Also write TensorBoard scalars in runs/NAME/tensorboard/. Default: on.")] = None,  # noqa: E501
    nproc_per_node: Annotated[int | None, Opt("--nproc-per-node", help="Processes on this node. Default: GPUs, or 1 on CPU.")] = None,  # noqa: E501
    nnodes: Annotated[int, Opt("--nnodes", help="Nodes taking part.")] = 1,
    node_rank: Annotated[int | None, Opt("--node-rank", help="This node's rank (static rendezvous).")] = None,
    rdzv_endpoint: Annotated[str | None, Opt("--rdzv-endpoint", help="HOST:PORT of node 0, for --nnodes > 1.")] = None,  # noqa: E501
    workers: Annotated[int | None, Opt("--workers", help="Tokenising processes. Default: CPU count.")] = None,
    threads: Annotated[int | None, Opt("--threads", help="Torch threads of each process. Default: the cores other work leaves idle ÷ --nproc-per-node.")] = None,  # noqa: E501
    resume: Annotated[bool, Opt("--resume", help="Continue the run from its latest checkpoint.")] = False,
    stop_after: Annotated[int | None, Opt("--stop-after", help="Stop (with a checkpoint) after N steps of this launch, e.g. for a time-limited job.")] = None,  # noqa: E501
    dry_run: Annotated[bool, Opt("--dry-run", help="Print the trainer's command (torchrun's) and settings; write nothing.")] = False,  # noqa: E501
    torchrun: Annotated[bool, Opt("--torchrun", help="Start a one-process run under torchrun too (by default it starts its trainer directly, 4 s sooner).")] = False,  # noqa: E501
    export_hf: Annotated[bool, Opt("--export-hf", help="When training ends, write the model as a Hugging Face directory in RUNS_DIR/RUN/hf/ (blissctl export does it for any checkpoint).")] = False,  # noqa: E501
) -> None:
    from engine.pretrain.launch import LaunchConfig, launch_pretrain
    from engine.run_dir import RunDir

    launch = LaunchConfig(nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                          rdzv_endpoint=rdzv_endpoint, workers=workers, resume=resume, stop_after=stop_after,
                          dry_run=dry_run, torchrun=torchrun, export_hf=export_hf)
    flags = {
        "data": tuple(data) if data else None, "size": size, "val": val, "tokenizer": tokenizer,
        "seq_len": seq_len, "lr": lr, "global_batch_tokens": global_batch_tokens, "micro_batch": micro_batch,
        "steps": steps, "tokens": tokens, "warmup_frac": warmup, "seed": seed, "save_every": save_every,
        "lr_schedule": lr_schedule, "decay_steps": decay_steps, "init_from": init_from,
        "reset_optimizer": reset_optimizer,
        "keep": keep, "eval_every": eval_every, "eval_tokens": eval_tokens, "log_every": log_every,
        "fsdp": fsdp, "compile": compile_model, "device": device, "tensorboard": tensorboard, "threads": threads,
    }
    launch_pretrain(flags, launch, RunDir.named(run, runs_dir), say=lambda line: console.print(line, soft_wrap=True))
