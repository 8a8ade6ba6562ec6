"""Run the full BLISS method: rounds of selection and pretraining, the score model learning from the model being pretrained.

The pool is split into rounds+1 disjoint parts (by shard, or by hash of document id when shards are few). Round 0 pretrains the model, and the proxy, on a random --budget of part 0. Each round r ≥ 1 trains the score model on part r (proxy reset to round 0's, score model continued, the latest model as the KL target), keeps the top --budget of part r, and continues pretraining the model on it at lr·0.5^r; a decayed side branch of each round is evaluated. Every stage is a blissctl command in its own run directory under RUNS_DIR/RUN/ (watch it with `blissctl dashboard RUNS_DIR/RUN`); --resume continues from the last finished stage with the same result as an uninterrupted run. With no --pool it runs on the embedded sample (a few minutes on 2 cores).

Example: blissctl rounds --run rounds-bliss

Example: blissctl rounds --scorer random --run rounds-random   (the control arm)

Example: blissctl rounds --pool 'c4/en/c4-train.0*.json.gz' --val target.jsonl --rounds 3 --size 160m --round-tokens 200M --budget 20% --device cuda --run c4-rounds --dry-run
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from blissctl.common import console, handles_user_errors, run_blissctl_stage

Opt = typer.Option
DATA, ROUNDS, MODEL, SCORER, RUN = "Data", "Rounds", "Pretrained model", "Score model (each round)", "Run"


@handles_user_errors
def rounds_command(
    pool: Annotated[list[str] | None, Opt("--pool", metavar="PATH", help="Candidate pool: files, folders or globs (repeatable). Default: the embedded sample.", rich_help_panel=DATA)] = None,  # noqa: E501
    val: Annotated[str | None, Opt("--val", help="Target documents the score model learns to lower the loss on. Default: the embedded narrative set.", rich_help_panel=DATA)] = None,  # noqa: E501
    eval_val: Annotated[str | None, Opt("--eval-val", help="Documents the pretrained models are evaluated on. Default: --val.", rich_help_panel=DATA)] = None,  # noqa: E501
    tokenizer: Annotated[str | None, Opt("--tokenizer", help="tokenizer.json or hub id of every stage. Default: a BPE trained on round 0's part.", rich_help_panel=DATA)] = None,  # noqa: E501
    split: Annotated[str, Opt("--split", help="How the pool is split into rounds: shard, hash or auto.", rich_help_panel=DATA)] = "auto",  # noqa: E501
    rounds: Annotated[int, Opt("--rounds", help="Selection rounds after round 0.", rich_help_panel=ROUNDS)] = 2,
    scorer: Annotated[str, Opt("--scorer", help="bliss, or a control arm: random, dsir.", rich_help_panel=ROUNDS)] = "bliss",  # noqa: E501
    scorer_rounds: Annotated[int, Opt("--scorer-rounds", help="Train the score model in the first N rounds only (1: single-round BLISS); 0: every round.", rich_help_panel=ROUNDS)] = 0,  # noqa: E501
    budget: Annotated[str, Opt("--budget", help="What each round keeps of its part: a share (20%) or an amount (2M).", rich_help_panel=ROUNDS)] = "20%",  # noqa: E501
    unit: Annotated[str, Opt("--unit", help="What --budget counts: tokens or docs.", rich_help_panel=ROUNDS)] = "tokens",  # noqa: E501
    size: Annotated[str, Opt("--size", help="Model preset pretrained over the rounds.", rich_help_panel=MODEL)] = "tiny",
    seq_len: Annotated[int, Opt("--seq-len", help="Pretraining sequence length.", rich_help_panel=MODEL)] = 128,
    batch_tokens: Annotated[int, Opt("--batch-tokens", help="Pretraining tokens per optimiser step.", rich_help_panel=MODEL)] = 2048,  # noqa: E501
    round_tokens: Annotated[str, Opt("--round-tokens", help="Pretraining tokens of each round (100k, 1M, ...).", rich_help_panel=MODEL)] = "100k",  # noqa: E501
    lr: Annotated[float | None, Opt("--lr", help="Round 0's constant learning rate; round r uses lr·(--lr-factor)^r. Default: the preset's.", rich_help_panel=MODEL)] = None,  # noqa: E501
    lr_factor: Annotated[float, Opt("--lr-factor", help="Each round's learning rate relative to the round before.", rich_help_panel=MODEL)] = 0.5,  # noqa: E501
    decay_steps: Annotated[int | None, Opt("--decay-steps", help="Steps of each round's decayed evaluation branch. Default: a tenth of a round.", rich_help_panel=MODEL)] = None,  # noqa: E501
    eval_points: Annotated[int, Opt("--eval-points", help="Validation evaluations of the main line per round.", rich_help_panel=MODEL)] = 2,  # noqa: E501
    proxy: Annotated[str, Opt("--proxy", help="Proxy (and score model) preset.", rich_help_panel=SCORER)] = "tiny",
    proxy_steps: Annotated[int, Opt("--proxy-steps", help="Round 0's pretraining steps of the proxy.", rich_help_panel=SCORER)] = 100,  # noqa: E501
    scorer_steps: Annotated[int, Opt("--scorer-steps", help="Outer (bilevel) steps of each round's train-scorer.", rich_help_panel=SCORER)] = 30,  # noqa: E501
    scorer_seq_len: Annotated[int, Opt("--scorer-seq-len", help="Tokens per document the proxy and score model see.", rich_help_panel=SCORER)] = 128,  # noqa: E501
    scorer_batch_size: Annotated[int, Opt("--scorer-batch-size", help="Documents per bilevel batch.", rich_help_panel=SCORER)] = 16,  # noqa: E501
    inner_steps: Annotated[int, Opt("--inner-steps", help="K: proxy steps per outer step (the reference: 5).", rich_help_panel=SCORER)] = 2,  # noqa: E501
    z_steps: Annotated[int, Opt("--z-steps", help="Iterations of each outer step's z-solve (the reference: 3).", rich_help_panel=SCORER)] = 1,  # noqa: E501
    lr_proxy: Annotated[float | None, Opt("--lr-proxy", help="Proxy learning rate in the bilevel phase. Default: the preset's.", rich_help_panel=SCORER)] = None,  # noqa: E501
    lr_scorer: Annotated[float, Opt("--lr-scorer", help="Score model learning rate.", rich_help_panel=SCORER)] = 1e-3,
    gamma: Annotated[float, Opt("--gamma", help="Weight of KL(latest model ‖ proxy).", rich_help_panel=SCORER)] = 1e-2,
    score_scale: Annotated[float, Opt("--score-scale", help="β in the bilevel batch weights softmax(β·s).", rich_help_panel=SCORER)] = 1.0,  # noqa: E501
    chunks: Annotated[int, Opt("--chunks", help="BLISS scores a document as the mean over its first N chunks.", rich_help_panel=SCORER)] = 4,  # noqa: E501
    run: Annotated[str, Opt("--run", help="Experiment name: its stages go to RUNS_DIR/RUN/.", rich_help_panel=RUN)] = "rounds",  # noqa: E501
    runs_dir: Annotated[Path, Opt("--runs-dir", help="Folder holding the runs.", rich_help_panel=RUN)] = Path("runs"),
    seed: Annotated[int, Opt("--seed", help="Seed of every stage.", rich_help_panel=RUN)] = 0,
    device: Annotated[str, Opt("--device", help="cpu, cuda or auto, for every stage.", rich_help_panel=RUN)] = "cpu",
    threads: Annotated[int | None, Opt("--threads", help="Torch threads of every stage. Default: the machine's cores (pinned, so a rerun gives the same figures).", rich_help_panel=RUN)] = None,  # noqa: E501
    resume: Annotated[bool, Opt("--resume", help="Continue a stopped experiment from its last finished stage.", rich_help_panel=RUN)] = False,  # noqa: E501
    force: Annotated[bool, Opt("--force", help="Remove what this experiment wrote and start over.", rich_help_panel=RUN)] = False,  # noqa: E501
    round0_from: Annotated[str | None, Opt("--round0-from", metavar="EXPERIMENT", help="Start from this experiment's round 0 (copied): compare arms or score-model settings on one round 0.", rich_help_panel=RUN)] = None,  # noqa: E501
    dry_run: Annotated[bool, Opt("--dry-run", help="Print the blissctl commands the experiment runs; write nothing.", rich_help_panel=RUN)] = False,  # noqa: E501
) -> None:
    from blissctl.demo import _parse_amount
    from engine.data.sample import sample_pool_glob, sample_val_path
    from engine.errors import UserError
    from engine.experiment import pinned_threads
    from engine.rounds import RoundsSettings, dry_run_plan, run_rounds
    from engine.run_dir import RunDir, run_path

    if resume and force:
        raise UserError("--resume and --force contradict each other: choose one")
    settings = RoundsSettings(
        pool=tuple(pool) if pool else (sample_pool_glob(),), val=val or str(sample_val_path()), eval_val=eval_val or "",
        rounds=rounds, scorer=scorer, scorer_rounds=scorer_rounds, split=split, budget=budget, unit=unit, size=size,
        seq_len=seq_len, batch_tokens=batch_tokens, round_tokens=_parse_amount(round_tokens, "--round-tokens"), lr=lr,
        lr_factor=lr_factor, decay_steps=decay_steps, eval_points=eval_points, proxy=proxy, proxy_steps=proxy_steps,
        scorer_steps=scorer_steps, scorer_seq_len=scorer_seq_len, scorer_batch_size=scorer_batch_size,
        inner_steps=inner_steps, z_steps=z_steps, lr_proxy=lr_proxy, lr_scorer=lr_scorer, gamma=gamma, score_scale=score_scale, chunks=chunks, seed=seed,
        device=device, tokenizer=tokenizer, round0_from=str(run_path(round0_from, runs_dir).resolve()) if round0_from else None,
    )
    exp = RunDir.named(run, runs_dir).root
    pinned = ("--threads", str(threads)) if threads is not None else pinned_threads()
    if dry_run:
        for line in dry_run_plan(settings, exp, pinned):
            console.print(line, soft_wrap=True, markup=False, highlight=False)
        return

    import shlex

    def announce(number: int, stage, argv: list[str] | None) -> None:
        console.rule(f"[bold]{number} {stage.title}")
        if argv is None:
            console.print(f"[dim]already done in {stage.run_dir} (--force to redo)[/]")
        else:
            console.print("[dim]$ blissctl " + shlex.join(argv) + "[/]", soft_wrap=True)

    started = time.perf_counter()
    result = run_rounds(settings, exp, runner=run_blissctl_stage, announce=announce, resume=resume, force=force,
                        threads=pinned, say=lambda line: console.print(f"[dim]{line}[/]"))
    console.rule("[bold]rounds")
    print_rounds(result)
    console.print(f"{time.perf_counter() - started:.0f} s; results in {exp / 'rounds-result.json'} and "
                  f"{exp / 'rounds.md'}; watch or compare with: blissctl dashboard {exp}", soft_wrap=True)


def print_rounds(result: dict) -> None:
    from rich.table import Table

    # Short headers: ten columns must fit an 80-column terminal.
    table = Table(title=f"{result['name']}: one model, pretrained round after round", header_style="bold",
                  caption="val: validation loss of the decayed branch (main line in brackets); ρ: the score "
                          "model's rank correlation with the round before", padding=(0, 1))
    for column in ("round", "scorer", "kept", "thresh.", "tokens", "val", "ρ", "select s", "train s"):
        table.add_column(column, justify="right")
    for row in result["rounds"]:
        main = f" ({row['val_loss_main']:.3f})" if row["val_loss_main"] is not None else ""
        table.add_row(str(row["round"]), row["scorer"], f"{row['documents_kept']:,}", _num(row["threshold"], 3),
                      _tokens(row["tokens"]), _num(row["val_loss"], 3) + main, _num(row["drift_spearman"], 2),
                      _num(row["selection_cpu_s"], 0), _num(row["pretrain_cpu_s"], 0))
    console.print(table)
    for row in result["rounds"]:
        top = ", ".join(f"{source} {share:.0%}" for source, share in list(row["composition"].items())[:4])
        if top:
            console.print(f"round {row['round']} kept: {top}")


def _tokens(value) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}k"


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
