"""Evaluate a pretrain checkpoint: validation loss, perplexity and bits per byte.

Bits per byte (total NLL / (ln 2 × UTF-8 bytes of the text)) compare models with different tokenizers.
--checkpoint takes a checkpoints/step_NNNNNN folder or a pretrain run directory (its latest
checkpoint). The figures are printed and appended to the run's events.jsonl.

Example: blissctl eval --checkpoint runs/pythia-410m --val heldout.jsonl.zst
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
) -> None:
    from engine.eval.evaluate import EvalConfig, run_eval

    outcome = run_eval(EvalConfig(checkpoint=str(checkpoint or ""), val=val, seq_len=seq_len, batch_size=batch,
                                  device=device))
    result = outcome.result
    console.print(f"checkpoint {outcome.checkpoint}", soft_wrap=True)
    console.print(f"val loss {result.loss:.4f} · perplexity {result.perplexity:.2f} · "
                  f"bits per byte {result.bits_per_byte:.4f} ({result.tokens:,} tokens, {result.bytes:,} bytes)",
                  soft_wrap=True)
    if outcome.recorded_in is None:
        console.print("[dim]not inside a run directory: the figures were not recorded anywhere[/]", soft_wrap=True)
