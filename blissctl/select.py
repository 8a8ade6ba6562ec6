"""Score every document of a pool and keep the best under a budget.

Streams input shards (C4's *.json.gz, *.jsonl.zst, *.jsonl, parquet, a Hugging Face datasets save_to_disk folder; local or s3://, gs://, hf://, https://) through a scorer, keeps the best documents under the budget exactly (bounded top-k, ties broken by document id) and writes them, byte for byte, to runs/NAME/selected/ (or as parquet, or tokenised for Megatron/GPT-NeoX: --output-format) with a manifest and a report. With no --input it selects from the embedded sample. Also runs under torchrun, each rank scoring its own shards.

Example: blissctl select --input 'c4/en/c4-train.*.json.gz' --budget 30% --run c4-random

Example: blissctl select --input pool/ --budget 2M --scorer bliss --scorer-run my-scorer --run c4-bliss

Example: blissctl select --input pool/ --budget 30% --scorer dsir --val target.jsonl.zst --run c4-dsir

Example: torchrun --nproc-per-node 8 -m blissctl select --input pool/ --budget 20% --name big

Example: blissctl select --input 's3://bucket/fineweb/*.parquet' --text-field text --output-format megatron --run fw

Example (a Slurm array of 64 independent jobs; the last to finish writes the subset): blissctl select --input pool/ --budget 20% --run big --shard-index $SLURM_ARRAY_TASK_ID --num-shards 64

Example (select again from the saved scores, e.g. with another budget): blissctl select --input pool/ --budget 10% --run big --merge

Example (Ray Data: read tasks on the CPUs, 8 scorer actors with a GPU each): blissctl select --input pool/ --scorer bliss --scorer-run my-scorer --device cuda --engine ray --ray-address auto --ray-actors 8 --run big
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from blissctl.common import console, err_console, handles_user_errors
from engine.select.scorers import scorer_help


def _default_run_name(scorer: str, budget: str) -> str:
    """``random-30pct``, ``bliss-2M``: a valid run name whatever the budget text looks like."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{scorer}-" + budget.strip().replace("%", "pct"))


@handles_user_errors
def select_command(
    input: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", metavar="PATH", help="File, folder, glob or URL (s3://, gs://, hf://, https://) of input shards: JSONL (.json.gz, .jsonl.zst, .jsonl), .parquet, or a datasets save_to_disk folder (repeatable). Default: the embedded sample."),
    ] = None,
    budget: Annotated[str, typer.Option(help="Share of the pool (30%) or an amount (2M, 500k, 10000) in --unit.")] = "30%",
    run: Annotated[
        str | None,
        typer.Option(
            "--run", "--name",
            help="Run name: outputs go to RUNS_DIR/NAME/. Default: SCORER-BUDGET. Under torchrun write --name "
            "(torchrun's own parser takes --run for its --run-path).",
        ),
    ] = None,
    scorer: Annotated[str, typer.Option(help=f"How documents are scored: {scorer_help()}")] = "random",
    scorer_run: Annotated[
        str | None, typer.Option(help="For --scorer bliss or perplexity: a train-scorer run name, or a checkpoint path.")
    ] = None,
    val: Annotated[
        str | None, typer.Option("--val", metavar="PATH", help="For --scorer dsir: the target documents (file, folder or glob).")
    ] = None,
    unit: Annotated[str, typer.Option(help="What the budget counts: tokens or docs.")] = "tokens",
    temperature: Annotated[float, typer.Option(help="Gumbel-top-k temperature; 0 keeps the top scores exactly.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the random scorer and of the Gumbel noise.")] = 0,
    workers: Annotated[int, typer.Option(help="Reader processes (decompress, parse, tokenise); 0: none.")] = 2,
    threads: Annotated[int | None, typer.Option(help="Threads of the score model (on a CPU, sub-batches scored side by side, one torch thread each). Default: the cores other work leaves idle.")] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(help="Tokens of each document the scorer sees. Default: the score model's training length (bliss), 512 (random)."),
    ] = None,
    chunks: Annotated[int, typer.Option(help="bliss: average the scores of up to N seq-len chunks.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Documents per score-model forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="Where the score model runs: cpu or cuda.")] = "cpu",
    tokenizer: Annotated[
        str | None, typer.Option(help="tokenizer.json path or hub id. Default: train a BPE on the input.")
    ] = None,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary of the default trained tokenizer.")] = 8192,
    exact_token_counts: Annotated[
        bool, typer.Option(help="Tokenise whole documents for exact token counts (slower).")
    ] = False,
    # --- where the data is read from and written to
    text_field: Annotated[
        str,
        typer.Option(help="The field (JSONL) or column (parquet, Arrow) holding the text, e.g. --text-field content."),
    ] = "text",
    output_format: Annotated[
        str,
        typer.Option(
            help="What selected/ holds: jsonl.zst (kept lines byte for byte), parquet (every input column) or "
            "megatron (the subset tokenised with the run's tokenizer, subset_text_document.bin + .idx, for "
            "GPT-NeoX/Megatron-LM and blissctl pretrain), e.g. --output-format parquet."
        ),
    ] = "jsonl.zst",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run; scored shards are reused.")] = False,
    force: Annotated[bool, typer.Option(help="Discard an earlier selection of this run and start again.")] = False,
    runs_dir: Annotated[Path, typer.Option(help="Folder holding the runs.")] = Path("runs"),
    # ---- at scale (README "At scale")
    shard_index: Annotated[
        int | None,
        typer.Option(metavar="I", rich_help_panel="At scale",
                     help="Score only share I (0 to N-1) of the input shards, as one of N independent jobs "
                     "(e.g. --shard-index $SLURM_ARRAY_TASK_ID). Rerun a failed job as it was: it scores what is missing."),
    ] = None,
    num_shards: Annotated[
        int | None, typer.Option(metavar="N", rich_help_panel="At scale",
                                 help="How many independent jobs split the input, with --shard-index.")
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", rich_help_panel="At scale",
                           help="Score nothing: the exact top-k over every shard's score file, then the subset "
                           "(--budget, --unit and --temperature may differ from the shard jobs').")
    ] = False,
    merge_when_done: Annotated[
        bool, typer.Option(rich_help_panel="At scale",
                           help="The shard job that finds every share done merges (the last job writes the subset).")
    ] = True,
    engine: Annotated[
        str, typer.Option(rich_help_panel="At scale",
                          help="local (reader processes, the scorer here; or torchrun ranks) or ray (Ray Data: "
                          "read tasks on the cluster's CPUs, scorer actors on its GPUs). Example: --engine ray --ray-actors 4")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(rich_help_panel="At scale",
                                 help="--engine ray: the cluster to join (auto, HOST:6379). Default: RAY_ADDRESS, else a local one.")
    ] = None,
    ray_actors: Annotated[int, typer.Option(rich_help_panel="At scale", help="--engine ray: scorer actors in parallel.")] = 1,
    ray_gpus_per_actor: Annotated[
        float | None, typer.Option(rich_help_panel="At scale",
                                   help="--engine ray: GPUs per scorer actor. Default: 1 with --device cuda, else 0.")
    ] = None,
    ray_cpus_per_actor: Annotated[
        float | None, typer.Option(rich_help_panel="At scale",
                                   help="--engine ray: CPUs per scorer actor. Default: --threads or 1 for a model scorer, 0 for random and dsir (their work is in the read tasks).")
    ] = None,
) -> None:
    import os

    from engine.run_dir import RunDir
    from engine.runtime import is_main_process, thread_plan
    from engine.select.config import SelectConfig
    from engine.select.scorers import REGISTRY
    from engine.select.stage import run_select

    entry = REGISTRY.get(scorer)
    plan = None
    if entry is not None and entry.needs_run:  # a model scorer: torch runs in this process
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        # Under torchrun the sibling ranks starting up would read as load.
        plan = thread_plan(processes=processes, requested=threads, read_load=processes == 1)

    config = SelectConfig(
        inputs=tuple(input or ()), budget=budget, unit=unit, scorer=scorer, scorer_run=scorer_run, device=device,
        seq_len=seq_len, chunks=chunks, batch_size=batch_size, temperature=temperature, seed=seed, workers=workers,
        tokenizer=tokenizer, vocab_size=vocab_size, exact_token_counts=exact_token_counts, resume=resume,
        force=force, val=val, threads=plan.threads if plan else threads, runs_dir=str(runs_dir),
        text_field=text_field, output_format=output_format,
        shard_index=shard_index, num_shards=num_shards, merge=merge, merge_when_done=merge_when_done, engine=engine,
        ray_address=ray_address, ray_actors=ray_actors, ray_gpus_per_actor=ray_gpus_per_actor,
        ray_cpus_per_actor=ray_cpus_per_actor,
    )
    run_dir = RunDir.named(_default_run_name(scorer, budget) if run is None else run, runs_dir)
    if plan is not None and is_main_process():
        # On a CPU the threads score sub-batches side by side, one torch thread each (ModelScorer.use_threads).
        console.print(f"[dim]{plan.describe('scoring threads')}[/]")
    if not is_main_process():  # under torchrun only rank 0 talks to the terminal
        run_select(config, run_dir)
        return
    with _SelectDisplay() as display:
        manifest = run_select(config, run_dir, progress=display.update)
    if config.shard_index is not None:
        print_share(manifest, run_dir.root)
        if manifest.manifest is None:
            return
        manifest = manifest.manifest
    print_summary(manifest, run_dir.root)


class _SelectDisplay:
    """A rich progress bar for scoring (bytes of input), then a line for each later phase."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[rates]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self.task = None
        self.phase = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.progress.stop()

    def update(self, update) -> None:
        if self.task is None:
            self.progress.start()  # only once there is something to show: errors stay one clean line
        if update.phase != self.phase:
            self.phase = update.phase
            if self.task is not None:
                self.progress.update(self.task, completed=self.progress.tasks[self.task].total or 1)
            if update.phase == "done":
                return
            self.task = self.progress.add_task(update.phase, total=update.total or 1, rates="")
        if update.phase == "scoring":
            rates = (
                f"{update.docs_seen:,} docs  {update.docs_per_s:,.0f} docs/s  {update.mb_per_s:.1f} MB/s"
                f"  {update.tokens_per_s / 1e6:.2f} M tok/s  skipped {update.skipped:,}"
            )
            self.progress.update(self.task, completed=update.completed, total=update.total or 1, rates=rates)
        elif update.total:
            self.progress.update(self.task, completed=update.completed, total=update.total)


def print_summary(manifest: dict, root: Path) -> None:
    from rich.table import Table

    docs, tokens = manifest["documents"], manifest["tokens"]
    table = Table(title=f"selection {manifest['run']}", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("seen", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("share", justify="right")
    table.add_row("documents", f"{docs['seen']:,}", f"{docs['kept']:,}", _pct(docs["kept"], docs["seen"]))
    table.add_row("tokens", f"{tokens['seen']:,}", f"{tokens['kept']:,}", _pct(tokens["kept"], tokens["seen"]))
    console.print(table)
    skipped = manifest["skipped"]
    reasons = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in skipped.items() if k != "total" and v)
    console.print(f"skipped lines: {skipped['total']:,}" + (f" ({reasons})" if reasons else ""))
    if manifest["score_threshold"] is not None:
        console.print(f"lowest kept score: {manifest['score_threshold']:.6g}")
    if manifest["budget"]["keeps_everything"]:
        console.print("[yellow]the budget covers the whole pool: every document is kept[/]")
    console.print(f"subset: {root / 'selected'}  report: {root / 'report' / 'select.md'}")


def print_share(result, root: Path) -> None:
    """What one shard job did, and what is left before the subset exists."""
    marker = result.marker
    console.print(f"share {marker['share']} of {marker['num_shards']}: {len(marker['shards']):,} input shard(s), "
                  f"{marker['documents']:,} documents, {marker['tokens']:,} tokens scored into {root / 'scores'}")
    if result.pending:
        listed = ", ".join(map(str, result.pending[:10])) + (" ..." if len(result.pending) > 10 else "")
        console.print(f"waiting for {len(result.pending):,} share(s) ({listed}); the last to finish writes the "
                      "subset, or run the same command with --merge instead of --shard-index")
    elif result.merged_elsewhere:
        console.print("every share is done; another job is merging them")
    elif result.manifest is None:
        console.print("every share is done: run the same command with --merge instead of --shard-index")


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
