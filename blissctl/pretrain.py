"""Pretrain a Pythia-family model (or LLaMA-0.5B) from scratch on a selected subset, under torchrun.

Tokenises --data once into packed sequences in the run directory, freezes the config, then runs
`torchrun ... -m engine.pretrain.worker` (DDP; FSDP with --fsdp, the default from 1b up). Checkpoints
every --save-every steps; --resume continues exactly where the last one left off.

Example: blissctl pretrain --data runs/c4-bliss/selected --size 410m --nproc-per-node 8 --run pythia-410m
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blissctl.common import console, handles_user_errors

Opt = typer.Option


@handles_user_errors
def pretrain_command(
    data: Annotated[list[str] | None, Opt("--data", metavar="PATH", help="A select output (runs/NAME/selected) or JSONL shards: file, folder or glob; repeatable.")] = None,  # noqa: E501
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
    seed: Annotated[int | None, Opt("--seed", help="Seed of the initialisation and data order. Default: 0.")] = None,
    save_every: Annotated[int | None, Opt("--save-every", help="Checkpoint every N steps. Default: 1000.")] = None,
    keep: Annotated[int | None, Opt("--keep", help="Checkpoints kept. Default: 3.")] = None,
    eval_every: Annotated[int | None, Opt("--eval-every", help="Validation loss every N steps. Default: 1000.")] = None,  # noqa: E501
    eval_tokens: Annotated[int | None, Opt("--eval-tokens", help="Validation tokens per evaluation. Default: 1048576.")] = None,  # noqa: E501
    log_every: Annotated[int | None, Opt("--log-every", help="A step event every N steps. Default: 10.")] = None,
    fsdp: Annotated[bool | None, Opt("--fsdp/--no-fsdp", help="Shard with FSDP instead of DDP. Default: on from 1b up.")] = None,  # noqa: E501
    compile_model: Annotated[bool | None, Opt("--compile/--no-compile", help="torch.compile the transformer blocks.")] = None,  # noqa: E501
    device: Annotated[str | None, Opt("--device", help="auto, cuda or cpu. Default: auto.")] = None,
    nproc_per_node: Annotated[int | None, Opt("--nproc-per-node", help="Processes on this node. Default: GPUs, or 1 on CPU.")] = None,  # noqa: E501
    nnodes: Annotated[int, Opt("--nnodes", help="Nodes taking part.")] = 1,
    node_rank: Annotated[int | None, Opt("--node-rank", help="This node's rank (static rendezvous).")] = None,
    rdzv_endpoint: Annotated[str | None, Opt("--rdzv-endpoint", help="HOST:PORT of node 0, for --nnodes > 1.")] = None,  # noqa: E501
    workers: Annotated[int | None, Opt("--workers", help="Tokenising processes. Default: CPU count.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run from its latest checkpoint.")] = False,
    stop_after: Annotated[int | None, Opt("--stop-after", help="Stop (with a checkpoint) after N steps of this launch, e.g. for a time-limited job.")] = None,  # noqa: E501
    dry_run: Annotated[bool, Opt("--dry-run", help="Print the torchrun command and settings; write nothing.")] = False,
) -> None:
    from engine.errors import UserError
    from engine.pretrain.launch import (
        config_path,
        finalise_steps,
        format_command,
        prepare_data,
        resolve_config,
        run_forwarding_signals,
        torchrun_command,
        worker_environment,
        write_frozen_config,
    )
    from engine.run_dir import RunDir

    if nproc_per_node is None:
        nproc_per_node = _default_nproc(device)
    if stop_after is not None and stop_after < 1:
        raise UserError(f"--stop-after must be at least 1, got {stop_after}")
    rundir = RunDir.named(run, runs_dir)
    flags = {
        "data": tuple(data) if data else None, "size": size, "val": val, "tokenizer": tokenizer,
        "seq_len": seq_len, "lr": lr, "global_batch_tokens": global_batch_tokens, "micro_batch": micro_batch,
        "steps": steps, "tokens": tokens, "warmup_frac": warmup, "seed": seed, "save_every": save_every,
        "keep": keep, "eval_every": eval_every, "eval_tokens": eval_tokens, "log_every": log_every,
        "fsdp": fsdp, "compile": compile_model, "device": device, "world_size": nproc_per_node * max(nnodes, 1),
    }
    config = resolve_config(flags, rundir, resume=resume)
    cmd = torchrun_command(
        config_path(rundir), nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint, rdzv_id=f"blissctl-{rundir.name}", resume=resume, stop_after=stop_after,
    )
    if not resume and (rundir.checkpoints / "latest").exists():
        raise UserError(f"run {rundir.root} already has checkpoints; pass --resume to continue it or pick another --run")

    if dry_run:
        _describe(config, steps_known=config.steps is not None or config.tokens is not None)
        console.print(format_command(cmd), soft_wrap=True)
        return

    rundir.create()
    console.print(f"preparing data for [bold]{rundir.root}[/] …", soft_wrap=True)
    train, val_data = prepare_data(config, rundir, workers=workers)
    config = finalise_steps(config, train.n_tokens)
    console.print(
        f"train: {train.header['n_documents']:,} documents, {train.n_tokens:,} tokens "
        f"({train.n_sequences(config.seq_len):,} sequences of {config.seq_len})"
        + (f"; val: {val_data.n_tokens:,} tokens" if val_data is not None else ""),
        soft_wrap=True,
    )
    write_frozen_config(rundir, config)
    _describe(config, steps_known=True)
    console.print(format_command(cmd), soft_wrap=True)
    code = run_forwarding_signals(cmd, env=worker_environment())
    if code != 0:
        raise UserError(f"training failed (torchrun exited with status {code}); see the messages above")


def _default_nproc(device: str | None) -> int:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def _describe(config, *, steps_known: bool) -> None:
    steps = (str(config.steps) if config.steps is not None
             else f"{config.tokens:,} tokens" if config.tokens is not None else "one epoch of --data")
    console.print(
        f"model {config.size} · {'FSDP' if config.fsdp else 'DDP'} · {config.world_size} process(es) · "
        f"seq {config.seq_len} · {config.global_batch_tokens:,} tokens/step "
        f"(micro-batch {config.micro_batch} × {config.grad_accum} accumulation) · lr {config.lr:g} · steps {steps}",
        soft_wrap=True,
    )
