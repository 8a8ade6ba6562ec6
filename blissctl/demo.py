"""Run the whole BLISS chain on the embedded sample and compare it with random selection.

With no arguments, on the embedded pool (9,600 documents) and its 300 held-out narrative passages: train-scorer trains a tiny proxy LM and its score model against the passages; select keeps 30% of the pool's tokens with BLISS, and 30% at random (the control arm, same tokenizer); pretrain trains the same tiny model on each subset (same seed, token count and schedule); eval measures each on the passages. The demo then prints what each subset contains, validation loss, bits per byte, the loss against tokens trained, and BLISS's speed-up over random.

Each stage is the blissctl command it prints, so any one can be rerun by hand. Running the demo again with the same settings reuses finished stages and continues an interrupted one; --force redoes everything. About 4 minutes on 2 free CPU cores (longer when they are shared). The figures are also saved to RUNS_DIR/PREFIX-comparison.json.

Example: blissctl demo

Example: blissctl demo --runs-dir /tmp/runs --scorer-steps 60 --tokens 800k --force
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import orjson
import typer

from blissctl.common import console, handles_user_errors

Opt = typer.Option
ARMS = ("bliss", "random")


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """What the demo runs; recorded in RUNS_DIR/PREFIX.json so a rerun knows whether it may reuse results."""

    prefix: str = "demo"
    budget: str = "30%"
    proxy: str = "tiny"
    scorer_steps: int = 30
    scorer_warmup_steps: int = 100
    scorer_seq_len: int = 128
    scorer_batch_size: int = 16
    chunks: int = 4
    size: str = "tiny"
    seq_len: int = 128
    batch_tokens: int = 2048
    tokens: int = 400_000
    eval_points: int = 8
    seed: int = 0
    train: str = ""
    val: str = ""

    def run(self, part: str) -> str:
        return f"{self.prefix}-{part}"

    @property
    def steps(self) -> int:
        return -(-self.tokens // self.batch_tokens)

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // max(1, self.eval_points))


@dataclass
class Stage:
    """One blissctl invocation of the demo."""

    title: str
    argv: list[str]
    run_dir: Path
    done: Callable[[], bool]
    resumable: Callable[[], bool] = lambda: False
    timing: dict = field(default_factory=dict)


def plan(settings: DemoSettings, runs_dir: Path) -> list[Stage]:
    """The demo's stages in order, each with its command line and how to tell it has already run."""
    from engine.eval.compare import last_eval, stage_done

    scorer = runs_dir / settings.run("scorer")
    common = ["--runs-dir", str(runs_dir)]
    stages = [Stage(
        title=f"train-scorer: {settings.proxy} proxy, {settings.scorer_warmup_steps} warm-up + "
              f"{settings.scorer_steps} bilevel steps",
        argv=["train-scorer", "--train", settings.train, "--val", settings.val, "--run", scorer.name, *common,
              "--proxy", settings.proxy, "--steps", str(settings.scorer_steps),
              "--warmup-steps", str(settings.scorer_warmup_steps), "--seq-len", str(settings.scorer_seq_len),
              "--batch-size", str(settings.scorer_batch_size), "--val-batch-size", str(settings.scorer_batch_size),
              "--seed", str(settings.seed), "--device", "cpu"],
        run_dir=scorer,
        done=lambda: stage_done(scorer, "train-scorer") and (scorer / "checkpoints" / "score-model.pt").exists(),
        resumable=lambda: (scorer / "checkpoints" / "train-scorer-state.pt").exists(),
    )]
    tokenizer = scorer / "tokenizer.json"
    for arm in ARMS:
        select = runs_dir / settings.run(arm)
        # BLISS scores a document as the mean over its first few seq-len chunks (bench/README_quality.md: better
        # than the first chunk alone). Exact token counts for both arms, so that 30% means the same thing.
        scorer_flags = (["--scorer", "bliss", "--scorer-run", scorer.name, "--chunks", str(settings.chunks)]
                        if arm == "bliss" else ["--scorer", "random", "--tokenizer", str(tokenizer)])
        stages.append(Stage(
            title=f"select: {settings.budget} of the tokens with {arm}",
            argv=["select", "--input", settings.train, "--budget", settings.budget, *scorer_flags,
                  "--seq-len", str(settings.scorer_seq_len), "--exact-token-counts", "--seed", str(settings.seed),
                  "--run", select.name, *common],
            run_dir=select,
            done=lambda select=select: (select / "selected" / "manifest.json").exists(),
            resumable=lambda select=select: "select" in _config(select),
        ))
    for arm in ARMS:
        lm = runs_dir / settings.run(f"{arm}-lm")
        stages.append(Stage(
            title=f"pretrain: {settings.size} model on the {arm} subset, {settings.steps * settings.batch_tokens:,} tokens",
            argv=["pretrain", "--data", str(runs_dir / settings.run(arm) / "selected"), "--run", lm.name, *common,
                  "--size", settings.size, "--val", settings.val, "--seq-len", str(settings.seq_len),
                  "--global-batch-tokens", str(settings.batch_tokens),
                  "--micro-batch", str(settings.batch_tokens // settings.seq_len), "--steps", str(settings.steps),
                  "--eval-every", str(settings.eval_every), "--log-every", str(settings.eval_every),
                  "--save-every", str(settings.steps), "--keep", "1", "--seed", str(settings.seed),
                  "--device", "cpu", "--nproc-per-node", "1"],
            run_dir=lm,
            done=lambda lm=lm: stage_done(lm, "pretrain"),
            resumable=lambda lm=lm: (lm / "checkpoints").is_dir() and any((lm / "checkpoints").iterdir()),
        ))
    for arm in ARMS:
        lm = runs_dir / settings.run(f"{arm}-lm")
        stages.append(Stage(
            title=f"eval: the {arm} model on the held-out passages",
            argv=["eval", "--checkpoint", str(lm), "--val", settings.val, "--device", "cpu"],
            run_dir=lm,
            done=lambda lm=lm: last_eval(lm) is not None,
        ))
    return stages


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    return orjson.loads(path.read_bytes()) if path.exists() else {}


def run_blissctl(argv: list[str]) -> int:
    """Run one stage as its own process (as a user would), output straight to the terminal."""
    return subprocess.run([sys.executable, "-m", "blissctl", *argv]).returncode


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stages(stages: list[Stage], runner: Callable[[list[str]], int] | None = None) -> None:
    """Run each stage not yet done, in order; a failed stage stops the demo with one line."""
    from engine.errors import UserError

    runner = runner or run_blissctl

    for number, stage in enumerate(stages, 1):
        console.rule(f"[bold]{number}/{len(stages)} {stage.title}")
        if stage.done():
            console.print(f"[dim]already done in {stage.run_dir} (--force to redo)[/]")
            continue
        argv = list(stage.argv)
        if stage.resumable():
            argv.append("--resume")
        console.print("[dim]$ blissctl " + " ".join(_quote(a) for a in argv) + "[/]", soft_wrap=True)
        wall, cpu = time.perf_counter(), _children_cpu_s()
        code = runner(argv)
        stage.timing = {"wall_s": time.perf_counter() - wall, "cpu_s": _children_cpu_s() - cpu}
        if code != 0:
            raise UserError(f"stage {number} ({argv[0]}) failed with exit status {code}; see its messages above. "
                            "Run the demo again to continue from there, or with --force to start over")


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def comparison(settings: DemoSettings, runs_dir: Path) -> dict:
    """The figures the final table shows, also saved to RUNS_DIR/PREFIX-comparison.json."""
    from engine.eval.compare import composition, last_eval, pretrain_curve, read_manifest, summarise_arms

    curves = {arm: pretrain_curve(runs_dir / settings.run(f"{arm}-lm")) for arm in ARMS}
    evals = {arm: last_eval(runs_dir / settings.run(f"{arm}-lm")) for arm in ARMS}
    summaries = summarise_arms(curves, reference="random", evals=evals)
    arms = {}
    for summary in summaries:
        manifest = read_manifest(runs_dir / settings.run(summary.name) / "selected")
        arms[summary.name] = {
            "documents_kept": manifest["documents"]["kept"], "documents_seen": manifest["documents"]["seen"],
            "tokens_kept": manifest["tokens"]["kept"], "tokens_seen": manifest["tokens"]["seen"],
            "val_loss": summary.final_loss, "bits_per_byte": summary.bits_per_byte,
            "perplexity": summary.perplexity, "speedup_vs_random": summary.speedup,
            "tokens_to_random_final_loss": summary.tokens_to_target,
            "curve": summary.curve, "composition": composition(manifest),
        }
    return {"settings": asdict(settings), "arms": arms}


def print_comparison(result: dict) -> None:
    from rich.table import Table

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

    narrative = ("austen_novels", "brown_corpus", "moby_dick", "shakespeare_milton_pkg", "t8_shakespeare", "kjv_bible")
    for name, arm in arms.items():
        share = sum(arm["composition"].get(s, 0.0) for s in narrative)
        console.print(f"{name}: {share:.0%} of its tokens are books (novels, Brown corpus, Shakespeare, Bible)")
    bliss, random = arms.get("bliss"), arms.get("random")
    if bliss and random and bliss["val_loss"] is not None and random["val_loss"] is not None:
        verdict = "lower" if bliss["val_loss"] < random["val_loss"] else "not lower"
        console.print(f"BLISS's validation loss is {verdict} than random's at equal tokens "
                      f"({bliss['val_loss']:.4f} vs {random['val_loss']:.4f}); speed-up to random's final loss: "
                      f"{format_speedup(bliss['speedup_vs_random'])}")


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _parse_amount(text: str) -> int:
    from engine.errors import UserError
    from engine.select.budget import parse_budget

    try:
        budget = parse_budget(text)
    except UserError:
        budget = None
    if budget is None or budget.amount is None:
        raise UserError(f"--tokens {text!r}: give an amount of tokens such as 400k or 1M")
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
    from engine.errors import UserError
    from engine.run_dir import atomic_write_json

    if seq_len < 1 or batch_tokens % seq_len:
        raise UserError(f"--batch-tokens {batch_tokens} must be a positive multiple of --seq-len {seq_len}")
    for flag, value in (("--scorer-steps", scorer_steps), ("--scorer-warmup-steps", scorer_warmup_steps),
                        ("--eval-points", eval_points), ("--chunks", chunks)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    settings = DemoSettings(
        prefix=prefix, budget=budget, proxy=proxy, scorer_steps=scorer_steps, scorer_warmup_steps=scorer_warmup_steps,
        scorer_seq_len=scorer_seq_len, chunks=chunks, size=size, seq_len=seq_len, batch_tokens=batch_tokens,
        tokens=_parse_amount(tokens), eval_points=eval_points, seed=seed, train=train or sample_pool_glob(),
        val=val or str(sample_val_path()),
    )
    stages = plan(settings, runs_dir)
    record = runs_dir / f"{prefix}.json"
    if force:
        for stage in stages:
            shutil.rmtree(stage.run_dir, ignore_errors=True)
        record.unlink(missing_ok=True)
    elif record.exists() and orjson.loads(record.read_bytes()).get("settings") != asdict(settings):
        raise UserError(f"{record} holds a demo run with other settings; pass --force to redo it with these, "
                        "or --prefix to keep both")
    runs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"settings": asdict(settings)})

    started = time.perf_counter()
    run_stages(stages)
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
