"""Export a pretrain checkpoint as a Hugging Face model directory (transformers, lm-eval, vLLM).

--checkpoint takes a checkpoints/step_NNNNNN folder or a pretrain run directory (its latest
checkpoint). --out receives config.json, generation_config.json, model.safetensors and the tokenizer
files; it is written under a temporary name and renamed into place, and an earlier export there is
replaced only with --force.

Example: blissctl export --checkpoint runs/pythia-410m --out exports/pythia-410m
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from blissctl.common import console, handles_user_errors

Opt = typer.Option


@handles_user_errors
def export_command(
    checkpoint: Annotated[Path, Opt("--checkpoint", help="A checkpoint folder, or a pretrain run directory (latest checkpoint).")],  # noqa: E501
    out: Annotated[Path, Opt("--out", help="The Hugging Face model directory to write.")],
    force: Annotated[bool, Opt("--force", help="Replace an earlier export at --out.")] = False,
) -> None:
    from engine.models.export import export_hf

    result = export_hf(checkpoint, out, force=force)
    step = f"step {result.step:,}" if result.step is not None else "its checkpoint"
    console.print(f"wrote {escape(str(result.path))}: {result.architecture}, {result.n_params / 1e6:.1f}M params, "
                  f"{step} of {escape(str(result.checkpoint))}", soft_wrap=True)
    console.print(f"load it: AutoModelForCausalLM.from_pretrained({escape(repr(str(result.path)))}) · "
                  f"lm_eval --model hf --model_args pretrained={escape(str(result.path))} --tasks lambada_openai",
                  soft_wrap=True)
