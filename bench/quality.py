"""What the subsets do to training: random vs BLISS vs DSIR vs perplexity filtering, on the evaluation pool.

On ../shared/corpus/pool/ (8 shards, 115k documents; ``--pool`` for another) with the held-out narrative
passages as the target, each method keeps 30% of the pool's tokens:
  random      blissctl select --scorer random (seeded control arm)
  bliss       blissctl train-scorer (proxy + score model) then blissctl select --scorer bliss
  dsir        PyPI data-selection's HashedNgramDSIR toward the target, resampling included (bench/dsir_baseline.py):
              the reference arm
  dsir-tool   blissctl select --scorer dsir: the same importance weights inside the tool, top-k
  perplexity  blissctl select --scorer perplexity: the train-scorer run's warmed-up proxy, lowest perplexity first
Then the same small model (same seed, token count, schedule, tokenizer) is pretrained on each subset with
blissctl pretrain, its validation loss logged every few steps, and blissctl eval gives the final loss and
bits per byte. The 978 narrative passages are split alternately: 489 are the selection target (train-scorer's
--val, DSIR's target), the other 489 are only ever used for evaluation.

A second target (``--target-source SOURCE``, with ``--pool`` the first four shards by default then): the
first ``--target-documents`` documents of one ``source`` from the other four shards, split alternately into
a target half and an evaluation half the same way. Use a WORK of its own; nothing is recorded in
bench/results with it (run ``--stop-after pretrain``): it is for checking a choice on a target besides the
narrative one.

Every stage is a blissctl command built by ``engine.experiment`` (the demo's own command lines) or the
baseline script, run as its own process, so the CPU-seconds of each (children's rusage) are measured;
finished stages are reused on a rerun (delete WORK/NAME to redo one).
Results: bench/results/quality.json, bench/results/quality.png, bench/README_quality.md.

    .venv/bin/python bench/quality.py [--tokens 2M] [--parallel 2] [--scorer-steps 60] ...
"""

from __future__ import annotations

import argparse
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import (  # noqa: E402
    POOL,
    RESULTS,
    SELECTION_SHARDS,
    VAL,
    add_target_arguments,
    record,
    run_command,
    target_files,
)

from engine.data.sample import BOOK_SOURCES  # noqa: E402
from engine.eval.compare import (  # noqa: E402
    composition,
    format_speedup,
    last_eval,
    loss_table,
    markdown_table,
    pretrain_curve,
    read_events,
    read_manifest,
    relative_speedup,
    stage_done,
    summarise_arms,
)
from engine.experiment import eval_argv, pretrain_argv, select_argv, train_scorer_argv  # noqa: E402

ARMS = ("random", "bliss", "dsir", "perplexity", "dsir-tool")
"""``dsir`` is the reference package (bench/dsir_baseline.py); ``dsir-tool`` is ``select --scorer dsir``."""
NOTES = RESULTS / "quality_notes.md"
"""Hand-written findings (what was tried and why), appended to the generated README section."""
BOOKS = BOOK_SOURCES


def last_tasks(run: Path) -> dict | None:
    """The last ``blissctl eval --tasks`` result of a pretraining run, if any."""
    found = [e for e in read_events(run, "eval") if e.get("kind") == "tasks"]
    return found[-1] if found else None


def run_logged(argv: list[str], log: Path, threads: int | None) -> dict:
    """Run ``argv`` with its output in ``log``; wall and CPU seconds of it and its children."""
    print("$ " + shlex.join(argv), flush=True)
    cost = run_command(argv, log=log, threads=threads)
    return {"wall_s": cost["wall_s"], "cpu_s": cost["cpu_s"], "command": cost["command"]}


def blissctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "blissctl", *args]


def load_costs(work: Path) -> dict:
    path = work / "costs.json"
    return orjson.loads(path.read_bytes()) if path.exists() else {}


def save_cost(work: Path, key: str, figures: dict) -> None:
    costs = load_costs(work)
    costs[key] = figures
    (work / "costs.json").write_bytes(orjson.dumps(costs, option=orjson.OPT_INDENT_2))


def prepare_subsets(args, work: Path, target: Path) -> None:
    """train-scorer, then one selection per arm: the demo's command lines (``engine.experiment``)."""
    scorer = work / args.scorer_run
    log = work / "bench.log"
    if not stage_done(scorer, "train-scorer"):
        cost = run_logged(blissctl(*train_scorer_argv(
            train=str(args.pool), val=str(target), run=args.scorer_run, runs_dir=work, proxy=args.proxy,
            steps=args.scorer_steps, warmup_steps=args.scorer_warmup_steps, seq_len=args.scorer_seq_len,
            batch_size=args.scorer_batch_size, seed=args.seed, extra=tuple(args.scorer_flags.split()))),
            log, args.threads)
        save_cost(work, f"train-scorer:{args.scorer_run}", cost)
    runs = arm_runs(args)
    for arm in ("random", "bliss", "perplexity", "dsir-tool"):  # random first: DSIR's reference reads its counts
        if arm not in args.arms or (work / runs[arm] / "selected" / "manifest.json").exists():
            continue
        cost = run_logged(blissctl(*select_argv(
            arm=SCORER_OF_ARM[arm], train=str(args.pool), val=str(target), budget=args.budget, run=runs[arm],
            runs_dir=work, scorer_run=scorer, seq_len=args.scorer_seq_len, seed=args.seed, chunks=args.chunks,
            extra=("--workers", str(args.workers)))), log, args.threads)
        save_cost(work, f"select:{runs[arm]}", cost)
    if "dsir" in args.arms and not (work / "dsir" / "selected" / "manifest.json").exists():
        fraction = float(args.budget.rstrip("%")) / 100
        cost = run_logged([sys.executable, str(ROOT / "bench" / "dsir_baseline.py"), "--pool", str(args.pool),
                           "--target", str(target), "--counts-run", str(work / "random"), "--run", str(work / "dsir"),
                           "--budget", str(fraction), "--seed", str(args.seed), "--num-proc", str(args.dsir_procs),
                           "--tokenizer", str(scorer / "tokenizer.json")], log, args.threads)
        previous = load_costs(work).get("dsir")
        if previous:  # the importance weights of an earlier, interrupted invocation were reused
            cost["cpu_s"] += previous.get("cpu_s", 0)
        save_cost(work, "dsir", cost)


SCORER_OF_ARM = {"random": "random", "bliss": "bliss", "perplexity": "perplexity", "dsir-tool": "dsir"}
"""The ``select --scorer`` of each arm run by blissctl (``dsir`` is the reference package's own run)."""


def arm_runs(args) -> dict[str, str]:
    """Arm name → selection run name."""
    return {arm: (args.bliss_run if arm == "bliss" else arm) for arm in args.arms}


def pretrain_arms(args, work: Path, held_out: Path) -> None:
    batch = args.batch_tokens
    steps = -(-args.tokens // batch)
    eval_every = max(1, steps // args.eval_points)

    def one(arm: str, select_run: str) -> None:
        lm = f"{select_run}-lm"
        log = work / f"{lm}.log"
        if not stage_done(work / lm, "pretrain"):
            resume = ("--resume",) if (work / lm / "checkpoints").is_dir() else ()
            cost = run_logged(blissctl(*pretrain_argv(
                data=work / select_run / "selected", run=lm, runs_dir=work, size=args.size, val=str(held_out),
                seq_len=args.seq_len, batch_tokens=batch, micro_batch=min(batch // args.seq_len, 32), steps=steps,
                eval_every=eval_every, seed=args.seed, extra=("--workers", "1", *resume))), log, args.threads)
            save_cost(work, f"pretrain:{lm}", cost)
        if last_eval(work / lm) is None:
            cost = run_logged(blissctl(*eval_argv(checkpoint=work / lm, val=str(held_out))), log, args.threads)
            save_cost(work, f"eval:{lm}", cost)
        if args.task_data and last_tasks(work / lm) is None:  # the paper's nine, zero-shot
            cost = run_logged(blissctl("eval", "--checkpoint", str(work / lm), "--tasks", "paper", "--task-data",
                                       str(args.task_data), "--device", "cpu"), log, args.threads)
            save_cost(work, f"tasks:{lm}", cost)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(one, arm, run) for arm, run in arm_runs(args).items()]:
            future.result()


def report(args, work: Path) -> dict:
    costs = load_costs(work)
    runs = arm_runs(args)
    curves = {arm: pretrain_curve(work / f"{run}-lm") for arm, run in runs.items()}
    evals = {arm: last_eval(work / f"{run}-lm") for arm, run in runs.items()}
    summaries = summarise_arms(curves, reference="random", evals=evals)
    scorer_cost = costs.get(f"train-scorer:{args.scorer_run}", {})
    warmup_share = _warmup_share(work / args.scorer_run)
    arms = {}
    for summary in summaries:
        run = runs[summary.name]
        manifest = read_manifest(work / run / "selected")
        pretrain = costs.get(f"pretrain:{run}-lm", {})
        if summary.name == "bliss":
            selection = scorer_cost.get("cpu_s", 0) + costs.get(f"select:{run}", {}).get("cpu_s", 0)
            selection_note = "train-scorer + scoring"
        elif summary.name == "perplexity":
            selection = warmup_share * scorer_cost.get("cpu_s", 0) + costs.get("select:perplexity", {}).get("cpu_s", 0)
            selection_note = f"proxy warm-up ({warmup_share:.0%} of train-scorer's wall time) + scoring"
        elif summary.name == "dsir-tool":
            selection = costs.get("select:dsir-tool", {}).get("cpu_s", 0)
            selection_note = "blissctl select --scorer dsir: n-gram fit on a pool sample + scoring + write"
        elif summary.name == "dsir":
            selection = costs.get("dsir", {}).get("cpu_s", 0)
            selection_note = "n-gram fit + importance weights + resample + write"
        else:
            selection = costs.get("select:random", {}).get("cpu_s", 0)
            selection_note = "scan + write"
        first = summary.curve[0] if summary.curve else None
        target = curves["random"][-1][1] if curves["random"] else None
        arms[summary.name] = {
            "selection_run": run,
            "documents_kept": manifest["documents"]["kept"],
            "tokens_kept": manifest["tokens"]["kept"],
            "tokens_seen": manifest["tokens"]["seen"],
            "val_loss": summary.final_loss,
            "bits_per_byte": summary.bits_per_byte,
            "perplexity": summary.perplexity,
            "speedup_vs_random": summary.speedup if summary.speedup is not None
            else relative_speedup(curves["random"], summary.curve),
            "speedup_is_lower_bound": bool(first and target is not None and first[1] <= target),
            "tokens_to_random_final_loss": summary.tokens_to_target,
            "curve": summary.curve,
            "composition": composition(manifest),
            "books_share": sum(composition(manifest).get(s, 0.0) for s in BOOKS),
            "selection_cpu_s": round(selection, 1),
            "selection_cost": selection_note,
            "pretrain_cpu_s": pretrain.get("cpu_s"),
            "pretrain_wall_s": pretrain.get("wall_s"),
            "tasks_average": (last_tasks(work / f"{run}-lm") or {}).get("average_score"),
        }
    steps = -(-args.tokens // args.batch_tokens)
    return {
        "variants": bliss_variants(args, work, costs, curves["random"], curves.get("dsir")),
        "seed_checks": seed_checks(work),
        "pool": str(args.pool), "val": str(VAL), "budget": args.budget,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pretrain_tokens": steps * args.batch_tokens,
        "costs": costs,
        "arms": arms,
        "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
    }


def bliss_variants(args, work: Path, costs: dict, random_curve, dsir_curve) -> list[dict]:
    """Every BLISS setting tried (``--variants``): its scorer settings, selection cost and result."""
    from engine.eval.compare import relative_speedup

    out = []
    for run in args.variants:
        lm = work / f"{run}-lm"
        result = last_eval(lm)
        if result is None:
            continue
        select_cfg = orjson.loads((work / run / "config.json").read_bytes())["select"]
        scorer_run = select_cfg["scorer_run"]
        scorer_cfg = orjson.loads((work / scorer_run / "config.json").read_bytes())["train-scorer"]
        curve = pretrain_curve(lm)
        manifest = read_manifest(work / run / "selected")
        out.append({
            "selection_run": run, "scorer_run": scorer_run,
            "scorer": {k: scorer_cfg.get(k) for k in ("proxy", "steps", "warmup_steps", "lr_scorer", "seq_len",
                                                        "batch_size", "inner_steps")},
            "chunks": select_cfg.get("chunks"),
            "val_loss": result["loss_val"], "bits_per_byte": result["bits_per_byte"],
            "speedup_vs_random": relative_speedup(random_curve, curve),
            "speedup_vs_dsir": relative_speedup(dsir_curve, curve) if dsir_curve else None,
            "books_share": sum(composition(manifest).get(s, 0.0) for s in BOOKS),
            "selection_cpu_s": round(costs.get(f"train-scorer:{scorer_run}", {}).get("cpu_s", 0)
                                     + costs.get(f"select:{run}", {}).get("cpu_s", 0), 1),
            "curve": curve,
        })
    return out


def seed_checks(work: Path) -> dict:
    """Pretraining reruns with another seed (``WORK/NAME-lm-seedN``, same subset and flags but ``--seed``)."""
    out = {}
    for lm in sorted(work.glob("*-lm-seed*")):
        result = last_eval(lm)
        if result is not None:
            out[lm.name] = {"val_loss": result["loss_val"], "bits_per_byte": result["bits_per_byte"],
                            "curve": pretrain_curve(lm)}
    return out


def _warmup_share(scorer_run: Path) -> float:
    """Share of train-scorer's wall time spent warming the proxy up (what the perplexity filter needs)."""
    events = read_events(scorer_run, "train-scorer")
    starts = [e["ts"] for e in events if e.get("kind") == "start"]
    warmups = [e["ts"] for e in events if e.get("kind") == "warmup"]
    done = [e["ts"] for e in events if e.get("kind") == "done"]
    if not (starts and warmups and done) or done[-1] <= starts[0]:
        return 0.0
    return (warmups[-1] - starts[0]) / (done[-1] - starts[0])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, arm in result["arms"].items():
        if arm["curve"]:
            tokens, losses = zip(*arm["curve"], strict=True)
            ax.plot([t / 1e6 for t in tokens], losses, marker="o", markersize=3, label=name)
    random = result["arms"].get("random")
    if random and random["curve"]:
        ax.axhline(random["curve"][-1][1], color="grey", linestyle="--", linewidth=0.8, label="random's final loss")
    ax.set_xlabel("tokens trained (M)")
    ax.set_ylabel("validation loss (nats/token, held-out narrative)")
    s = result["settings"]
    ax.set_title(f"{s['size']} model, {result['pretrain_tokens'] / 1e6:.1f}M tokens, 30% subsets of the pool")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def readme(result: dict) -> str:
    arms = result["arms"]
    rows = []
    for name, arm in arms.items():
        speed = format_speedup(arm["speedup_vs_random"])
        if arm["speedup_is_lower_bound"] and arm["speedup_vs_random"] is not None:
            speed = "≥ " + speed
        rows.append([name, arm["documents_kept"], arm["tokens_kept"], arm["val_loss"], arm["bits_per_byte"],
                     speed, f"{arm['books_share']:.0%}", round(arm["selection_cpu_s"]),
                     round(arm["pretrain_cpu_s"]) if arm["pretrain_cpu_s"] is not None else None])
    columns = ["method", "docs kept", "tokens kept", "val loss", "bits/byte", "speed-up vs random", "books share",
               "selection CPU-s", "pretrain CPU-s"]
    if any(arm.get("tasks_average") is not None for arm in arms.values()):  # --task-data was given
        columns.append("9-task avg %")
        for row, arm in zip(rows, arms.values(), strict=True):
            average = arm.get("tasks_average")
            row.append(None if average is None else round(100 * average, 1))
    summary = markdown_table(columns, rows)
    header, curve_rows = loss_table({name: [tuple(p) for p in arm["curve"]] for name, arm in arms.items()})
    curves = markdown_table(header, curve_rows)
    sources: list[str] = []
    for arm in arms.values():
        sources += [s for s in list(arm["composition"])[:6] if s not in sources]
    comp_rows = [[s] + [f"{arm['composition'].get(s, 0.0):.1%}" for arm in arms.values()] for s in sources]
    comp = markdown_table(["source (share of the subset's tokens)"] + list(arms), comp_rows)
    variant_rows = [[v["selection_run"], v["scorer"]["proxy"], v["scorer"]["steps"], v["scorer"]["warmup_steps"],
                     v["scorer"]["lr_scorer"], v["scorer"]["seq_len"], v["chunks"], v["val_loss"], v["bits_per_byte"],
                     format_speedup(v["speedup_vs_random"]), format_speedup(v["speedup_vs_dsir"]),
                     f"{v['books_share']:.0%}", round(v["selection_cpu_s"])] for v in result.get("variants", [])]
    variants = markdown_table(["selection", "proxy", "outer steps", "warm-up", "lr scorer", "seq len", "chunks",
                               "val loss", "bits/byte", "speed-up vs random", "vs DSIR", "books share",
                               "selection CPU-s"], variant_rows) if variant_rows else "(none recorded)"
    s = result["settings"]
    return "\n".join([
        "## Quality: what the subsets do to training",
        "",
        f"Pool: `{Path(result['pool']).name}/` ({next(iter(arms.values()))['tokens_seen']:,} tokens with the "
        f"scorer's {s['scorer_seq_len']}-token-prefix counting); each method keeps {result['budget']} of the tokens. "
        f"Target: 489 of the 978 held-out narrative passages (alternate lines); the other 489 are only used for "
        f"evaluation. The `bliss` row is selection `{s['bliss_run']}`: score model `{s['scorer_run']}` "
        f"(`{s['proxy']}` proxy, {s['scorer_steps']} bilevel steps), `select --chunks {s['chunks']}`. "
        f"Every arm pretrains the same `{s['size']}` model (seed {s['seed']}, seq {s['seq_len']}, "
        f"{s['batch_tokens']:,} tokens a step, {result['pretrain_tokens']:,} tokens, same cosine schedule, the "
        f"scorer run's tokenizer). Validation loss is on the 489 held-out passages; bits per byte from "
        f"`blissctl eval`. Speed-up: tokens random needs to reach its own final validation loss ÷ tokens the method "
        f"needs (linear interpolation between evaluations; \"≥\" when the method is already below it at the first "
        f"evaluation; below 1×, for a method that never reaches it: tokens random needed to reach the method's final "
        f"loss ÷ the method's tokens). Selection CPU-s: {arms.get('bliss', {}).get('selection_cost', '')} for BLISS; pretraining "
        f"CPU-s per arm beside it. 2 CPU cores shared with other work: CPU-seconds, not wall time, are the cost.",
        "",
        summary,
        "",
        "Validation loss against tokens trained:",
        "",
        curves,
        "",
        "![loss vs tokens](results/quality.png)",
        "",
        "What each subset contains:",
        "",
        comp,
        "",
        "BLISS settings tried (same pretraining as above; the table's `bliss` row is "
        f"`{s['bliss_run']}`; speed-up vs DSIR: tokens DSIR needs to reach its own final loss ÷ tokens this "
        "subset needs):",
        "",
        variants,
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
    ] + ([NOTES.read_text()] if NOTES.exists() else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="where the runs go")
    parser.add_argument("--pool", type=Path, default=None,
                        help="the candidate pool (default: ../shared/corpus/pool; its first four shards with "
                             "--target-source)")
    parser.add_argument("--budget", default="30%")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proxy", default="tiny")
    parser.add_argument("--scorer-run", default="scorer-tiny")
    parser.add_argument("--bliss-run", default="bliss", help="name of the bliss selection run")
    parser.add_argument("--scorer-steps", type=int, default=60)
    parser.add_argument("--scorer-warmup-steps", type=int, default=300)
    parser.add_argument("--scorer-seq-len", type=int, default=128)
    parser.add_argument("--scorer-batch-size", type=int, default=16)
    parser.add_argument("--scorer-flags", default="", help="extra train-scorer flags, e.g. '--lr-scorer 1e-3'")
    parser.add_argument("--chunks", type=int, default=1, help="select --chunks for bliss")
    parser.add_argument("--variants", default="", help="comma-separated bliss selection runs to list as attempts")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--tokens", type=float, default=2e6)
    parser.add_argument("--eval-points", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=1, help="pretraining runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--workers", type=int, default=1, help="select's reader processes")
    parser.add_argument("--dsir-procs", type=int, default=1)
    parser.add_argument("--stop-after", choices=("subsets", "pretrain"), default=None)
    parser.add_argument("--task-data", type=Path, default=None,
                        help="a folder of the paper's nine tasks (README, 'Downstream evaluation'): adds their average")
    add_target_arguments(parser)
    args = parser.parse_args()
    if args.pool is None:
        args.pool = Path(SELECTION_SHARDS) if args.target_source else POOL
    if args.target_source and args.stop_after != "pretrain":
        parser.error("--target-source runs with --stop-after pretrain (bench/results holds the narrative target)")
    args.tokens = int(args.tokens)
    args.arms = [a for a in args.arms.split(",") if a]
    args.variants = [v for v in args.variants.split(",") if v]
    work = args.work.resolve()
    args.work = str(work)
    work.mkdir(parents=True, exist_ok=True)
    target, held_out = target_files(args, work)
    prepare_subsets(args, work, target)
    if args.stop_after == "subsets":
        return
    pretrain_arms(args, work, held_out)
    if args.stop_after == "pretrain":
        return
    result = report(args, work)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(result, RESULTS / "quality.png")
    record("quality", result)
    (ROOT / "bench" / "README_quality.md").write_text(readme(result))


if __name__ == "__main__":
    main()
