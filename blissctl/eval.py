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
    from engine.errors import UserError
    from engine.eval.evaluate import evaluate_checkpoint
    from engine.models.checkpoints import resolve_checkpoint, run_dir_of
    from engine.run_dir import RunDir

    if checkpoint is None:
        raise UserError("--checkpoint is required: a checkpoints/step_NNNNNN folder or a pretrain run directory")
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device must be auto, cuda or cpu, got {device!r}")
    folder = resolve_checkpoint(checkpoint)
    run = RunDir(run_dir_of(folder))
    if val is None:
        val = run.read_config().get("pretrain", {}).get("val")
        if not val:
            raise UserError("--val is required: this run was trained without a validation set")
    result, folder = evaluate_checkpoint(folder, val, seq_len=seq_len, batch_size=batch, device=device)
    with run.events("eval") as events:
        events.emit("eval", loss_val=result.loss, perplexity=result.perplexity,
                    bits_per_byte=result.bits_per_byte, checkpoint=str(folder), tokens=result.tokens,
                    bytes=result.bytes, val=str(val))
    console.print(f"checkpoint {folder}", soft_wrap=True)
    console.print(f"val loss {result.loss:.4f} · perplexity {result.perplexity:.2f} · "
                  f"bits per byte {result.bits_per_byte:.4f} ({result.tokens:,} tokens, {result.bytes:,} bytes)",
                  soft_wrap=True)
