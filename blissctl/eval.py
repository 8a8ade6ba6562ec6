"""Evaluate a pretrain checkpoint: validation loss, perplexity and bits per byte, and zero-shot accuracy on downstream tasks.

Bits per byte (total NLL / (ln 2 × UTF-8 bytes of the text)) compare models with different tokenizers. --checkpoint takes a checkpoints/step_NNNNNN folder or a pretrain run directory (its latest checkpoint). With --tasks, lm-evaluation-harness scores the model zero-shot (acc, acc_norm) on tasks read from --task-data (each task's examples as local files: nothing is downloaded); --tasks paper is the BLISS paper's nine. The figures are printed, appended to the run's events.jsonl and written to report/eval.md.

Example: blissctl eval --checkpoint runs/pythia-410m --val heldout.jsonl.zst

Example: blissctl eval --checkpoint runs/pythia-410m --tasks paper --task-data ~/bliss-tasks
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blissctl.common import console, handles_user_errors

Opt = typer.Option


@handles_user_errors
def eval_command(
    checkpoint: Annotated[Path | None, Opt("--checkpoint", help="A checkpoint folder, or a pretrain run directory (latest checkpoint).")] = None,  # noqa: E501
    val: Annotated[str | None, Opt("--val", help="Held-out documents (JSONL shards). Default: the run's --val.")] = None,  # noqa: E501
    seq_len: Annotated[int | None, Opt("--seq-len", help="Tokens per window. Default: the training length.")] = None,  # noqa: E501
    batch: Annotated[int, Opt("--batch", help="Windows per forward pass.")] = 8,
    device: Annotated[str, Opt("--device", help="auto, cuda or cpu.")] = "auto",
    tasks: Annotated[str | None, Opt("--tasks", help="Comma-separated lm-eval tasks, or 'paper' for sciq, arc_easy, arc_challenge, logiqa, openbookqa, boolq, hellaswag, piqa, winogrande.")] = None,  # noqa: E501
    task_data: Annotated[Path | None, Opt("--task-data", help="Folder of each task's examples: DIR/TASK/SPLIT.jsonl (see README).")] = None,  # noqa: E501
    task_batch: Annotated[int, Opt("--task-batch", help="Examples per lm-eval forward pass.")] = 16,
    task_limit: Annotated[int | None, Opt("--task-limit", help="At most this many examples per task (a quick look).")] = None,  # noqa: E501
    threads: Annotated[int | None, Opt("--threads", help="Torch threads. Default: the cores other work leaves idle (printed at start).")] = None,  # noqa: E501
) -> None:
    from engine.eval.evaluate import EvalConfig, run_eval
    from engine.eval.tasks import parse_tasks
    from engine.runtime import thread_plan

    plan = thread_plan(requested=threads)
    console.print(f"[dim]{plan.describe()}[/]")
    outcome = run_eval(EvalConfig(
        checkpoint=str(checkpoint or ""), val=val, seq_len=seq_len, batch_size=batch, device=device,
        tasks=parse_tasks(tasks) if tasks else (), task_data=str(task_data) if task_data else None,
        task_batch_size=task_batch, task_limit=task_limit, threads=plan.threads,
    ))
    console.print(f"checkpoint {outcome.checkpoint}", soft_wrap=True)
    result = outcome.result
    if result is not None:
        console.print(f"val loss {result.loss:.4f} · perplexity {result.perplexity:.2f} · "
                      f"bits per byte {result.bits_per_byte:.4f} ({result.tokens:,} tokens, {result.bytes:,} bytes)",
                      soft_wrap=True)
    if outcome.tasks is not None:
        print_tasks(outcome.tasks)
    if outcome.recorded_in is None:
        console.print("[dim]not inside a run directory: the figures were not recorded anywhere[/]", soft_wrap=True)


def print_tasks(results) -> None:
    from rich.table import Table

    from engine.eval.tasks import format_table

    header, *rows = format_table(results)
    title = f"zero-shot accuracy, % (lm-eval {results.lm_eval_version})"
    table = Table(title=title + (f", ≤ {results.limit} examples a task" if results.limit else ""),
                  header_style="bold")
    for column in header:
        table.add_column(column, justify="left" if column == "task" else "right")
    for row in rows:
        table.add_row(*row, style="bold" if row[0] == "average" else None)
    console.print(table)
