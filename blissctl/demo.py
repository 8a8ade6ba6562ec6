"""Run the whole BLISS chain on the embedded sample and compare it with random selection.

With no arguments, on the embedded pool (9,600 documents) and its 300 held-out narrative passages: train-scorer trains a tiny proxy LM and its score model against the passages; select keeps 30% of the pool's tokens with BLISS, and 30% at random (the control arm, same tokenizer); pretrain trains the same tiny model on each subset (same seed, token count and schedule); eval measures each on the passages. The demo then prints what each subset contains, validation loss, bits per byte, the loss against tokens trained, and BLISS's speed-up over random.

Each stage is the blissctl command it prints, so any one can be rerun by hand. After train-scorer the two arms run side by side, each on half the cores (their output is shown when each ends, and kept in RUNS_DIR/PREFIX-logs/). Running the demo again with the same settings reuses finished stages and continues an interrupted one; --force redoes everything. About 2 minutes on 2 free CPU cores (up to 7 when they are shared). The figures are also saved to RUNS_DIR/PREFIX-comparison.json.

Example: blissctl demo

Example: blissctl demo --runs-dir /tmp/runs --scorer-steps 60 --tokens 800k --force
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from blissctl.common import console, handles_user_errors, run_blissctl_stage, run_blissctl_stages_beside

Opt = typer.Option


def _announce(number: int, total: int, stage, argv: list[str] | None) -> None:
    import shlex

    console.rule(f"[bold]{number}/{total} {stage.title}")
    if argv is None:
        console.print(f"[dim]already done in {stage.run_dir} (--force to redo)[/]")
    else:
        console.print("[dim]$ blissctl " + " ".join(shlex.quote(a) for a in argv) + "[/]", soft_wrap=True)


def print_comparison(result: dict) -> None:
    from rich.table import Table

    from engine.data.sample import BOOK_SOURCES
    from engine.eval.compare import format_speedup, loss_table

    arms = result["arms"]
    table = Table(title="BLISS vs random: the same tiny model, the same tokens", header_style="bold")
    for column in ("subset", "docs kept", "tokens kept", "val loss", "bits/byte", "ppl", "speed-up"):
        table.add_column(column, justify="left" if column == "subset" else "right")
    for name, arm in arms.items():
        table.add_row(
            name, f"{arm['documents_kept']:,}", f"{arm['tokens_kept']:,}", _num(arm["val_loss"]),
            _num(arm["bits_per_byte"]), _num(arm["perplexity"], 1),
            format_speedup(arm["speedup_vs_random"]),
        )
    table.caption = ("speed-up: tokens random needs to reach its own final validation loss ÷ tokens the subset "
                     "needs to reach it")
    console.print(table)

    sources: list[str] = []
    for arm in arms.values():
        sources += [s for s in list(arm["composition"])[:6] if s not in sources]
    contents = Table(title="what each subset contains (share of its tokens)", header_style="bold")
    contents.add_column("source")
    for name in arms:
        contents.add_column(name, justify="right")
    for source in sources:
        contents.add_row(source, *(f"{arm['composition'].get(source, 0.0):.1%}" for arm in arms.values()))
    contents.add_row("[dim]other sources[/]", *(
        f"[dim]{1 - sum(arm['composition'].get(s, 0.0) for s in sources):.1%}[/]" for arm in arms.values()))
    console.print(contents)

    header, rows = loss_table({name: [tuple(p) for p in arm["curve"]] for name, arm in arms.items()})
    curve_table = Table(title="validation loss against tokens trained", header_style="bold")
    for column in header:
        curve_table.add_column(column, justify="right")
    for row in rows:
        curve_table.add_row(f"{row[0]:,}", *(_num(v) for v in row[1:]))
    console.print(curve_table)

    for name, arm in arms.items():
        share = sum(arm["composition"].get(s, 0.0) for s in BOOK_SOURCES)
        console.print(f"{name}: {share:.0%} of its tokens are books (novels, Brown corpus, Shakespeare, Bible)")
    bliss, random = arms.get("bliss"), arms.get("random")
    if bliss and random and bliss["val_loss"] is not None and random["val_loss"] is not None:
        verdict = "lower" if bliss["val_loss"] < random["val_loss"] else "not lower"
        console.print(f"BLISS's validation loss is {verdict} than random's at equal tokens "
                      f"({bliss['val_loss']:.4f} vs {random['val_loss']:.4f}); speed-up to random's final loss: "
                      f"{format_speedup(bliss['speedup_vs_random'])}")


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _parse_amount(text: str, flag: str = "--tokens") -> int:
    from engine.errors import UserError
    from engine.select.budget import parse_budget

    try:
        budget = parse_budget(text)
    except UserError:
        budget = None
    if budget is None or budget.amount is None:
        raise UserError(f"{flag} {text!r}: give an amount of tokens such as 400k or 1M")
    return int(budget.amount)


@handles_user_errors
def demo_command(
    runs_dir: Annotated[Path, Opt("--runs-dir", help="Folder holding the demo's runs.")] = Path("runs"),
    prefix: Annotated[str, Opt("--prefix", help="Run names start with this: PREFIX-scorer, PREFIX-bliss, ...")] = "demo",
    budget: Annotated[str, Opt("--budget", help="Share of the pool's tokens each subset keeps.")] = "30%",
    proxy: Annotated[str, Opt("--proxy", help="Proxy preset of train-scorer.")] = "tiny",
    scorer_steps: Annotated[int, Opt("--scorer-steps", "--steps", help="Bilevel (outer) steps of train-scorer.")] = 30,
    scorer_warmup_steps: Annotated[int, Opt("--scorer-warmup-steps", help="Proxy warm-up steps of train-scorer.")] = 100,
    scorer_seq_len: Annotated[int, Opt("--scorer-seq-len", help="Tokens per document the proxy and the scorer see.")] = 128,
    chunks: Annotated[int, Opt("--chunks", help="BLISS scores a document as the mean over up to N scorer-seq-len chunks.")] = 4,
    size: Annotated[str, Opt("--size", help="Model preset pretrained on each subset.")] = "tiny",
    seq_len: Annotated[int, Opt("--seq-len", help="Pretraining sequence length.")] = 128,
    tokens: Annotated[str, Opt("--tokens", help="Pretraining tokens per subset (400k, 1M, ...).")] = "400k",
    batch_tokens: Annotated[int, Opt("--batch-tokens", help="Pretraining tokens per optimiser step.")] = 2048,
    eval_points: Annotated[int, Opt("--eval-points", help="Validation evaluations during each pretraining run.")] = 8,
    seed: Annotated[int, Opt("--seed", help="Seed of every stage.")] = 0,
    train: Annotated[str | None, Opt("--train", help="Candidate pool. Default: the embedded sample.")] = None,
    val: Annotated[str | None, Opt("--val", help="Held-out target passages. Default: the embedded narrative set.")] = None,
    force: Annotated[bool, Opt("--force", help="Delete this demo's earlier runs and redo every stage.")] = False,
) -> None:
    from engine.data.sample import sample_pool_glob, sample_val_path
    from engine.experiment import DemoSettings, comparison, prepare_demo, run_stages
    from engine.run_dir import atomic_write_json

    settings = DemoSettings(
        prefix=prefix, budget=budget, proxy=proxy, scorer_steps=scorer_steps, scorer_warmup_steps=scorer_warmup_steps,
        scorer_seq_len=scorer_seq_len, chunks=chunks, size=size, seq_len=seq_len, batch_tokens=batch_tokens,
        tokens=_parse_amount(tokens), eval_points=eval_points, seed=seed, train=train or sample_pool_glob(),
        val=val or str(sample_val_path()),
    )
    stages = prepare_demo(settings, runs_dir, force=force)
    started = time.perf_counter()
    run_stages(stages, runner=run_blissctl_stage,
               announce=lambda number, stage, argv: _announce(number, len(stages), stage, argv),
               beside=lambda runs: run_blissctl_stages_beside(runs, runs_dir / f"{prefix}-logs"))
    elapsed = time.perf_counter() - started
    result = comparison(settings, runs_dir)
    result["timings"] = {f"{i}:{s.argv[0]}:{s.run_dir.name}": s.timing for i, s in enumerate(stages, 1) if s.timing}
    result["elapsed_s"] = elapsed
    atomic_write_json(runs_dir / f"{prefix}-comparison.json", result)
    console.rule("[bold]comparison")
    print_comparison(result)
    ran = [s for s in stages if s.timing]
    if ran:
        console.print(f"stages run now: {len(ran)} in {elapsed / 60:.1f} min wall, "
                      f"{sum(s.timing['cpu_s'] for s in ran) / 60:.1f} CPU-min; "
                      f"figures saved to {runs_dir / (prefix + '-comparison.json')}", soft_wrap=True)
