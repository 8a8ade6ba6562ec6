"""Do the fast hypergradient routes select as well? Score models trained by each route, compared with
the exact route's (``--hypergrad graph --z-hvp exact``, run here as the reference) by what they select
and what that trains.

On the demo's setting (the embedded sample, its 300 narrative passages, a tiny proxy, 100 warm-up
steps; the random arm comes from a finished ``blissctl demo`` in ``--baseline``): for each variant,
``train-scorer`` with the variant's flags → ``select --scorer bliss --chunks 4`` 30% of the tokens →
``pretrain`` the demo's tiny model on it → ``eval``, every stage with the demo's pinned thread count.
Reported per variant: stage costs, the kept set's overlap with the exact route's (share of its
documents, and Jaccard), validation loss and the speed-up over the demo's random arm. The demo's
passages both steer and measure here (as in the demo); this is a check that the fast routes keep the
selection, not a quality benchmark (bench/quality.py is).

    .venv/bin/python bench/bliss_routes.py --baseline runs          # after `blissctl demo --runs-dir runs`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import kept_lines, overlap, record, run_blissctl  # noqa: E402

from engine.data.sample import sample_pool_glob, sample_val_path  # noqa: E402
from engine.eval.compare import last_eval, pretrain_curve, read_events, speedup, stage_done  # noqa: E402
from engine.experiment import (  # noqa: E402
    DemoSettings,
    eval_argv,
    pinned_threads,
    pretrain_argv,
    select_argv,
    train_scorer_argv,
)

REFERENCE = "graph-z3"
VARIANTS = {
    REFERENCE: "--hypergrad graph --z-hvp exact --z-steps 3",
    "fd-z3": "--hypergrad fd --z-hvp fd --z-steps 3",
    "fd-z1": "--hypergrad fd --z-hvp fd --z-steps 1",
    "fd-z1-60": "--hypergrad fd --z-hvp fd --z-steps 1 --steps 60",
}


def scorer_timing(run: Path) -> dict:
    """train-scorer's own wall time (its done event) and its bilevel rate (outer steps/s, last step event)."""
    events = read_events(run, "train-scorer")
    done = [e for e in events if e.get("kind") == "done"]
    steps = [e for e in events if e.get("kind") == "step"]
    return {"train_scorer_elapsed_s": done[-1]["elapsed_s"] if done else None,
            "outer_steps_per_s": steps[-1]["steps_per_s"] if steps else None,
            "z_cos_v_last": steps[-1].get("z_cos_v") if steps else None}


def run_stage(argv: list[str], log: Path) -> dict:
    cost = run_blissctl(argv, log=log)
    return {"wall_s": cost["wall_s"], "cpu_s": cost["cpu_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the runs folder of a finished blissctl demo")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "routes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    demo = DemoSettings(train=sample_pool_glob(), val=str(sample_val_path()))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    random_curve = pretrain_curve(args.baseline / demo.run("random-lm"))
    names = [REFERENCE] + [n for n in args.variants.split(",") if n != REFERENCE]  # the reference first
    results, reference_kept = {}, None
    for name in names:
        flags = VARIANTS[name].split()
        steps = demo.scorer_steps
        if "--steps" in flags:
            steps = int(flags[flags.index("--steps") + 1])
            del flags[flags.index("--steps"):flags.index("--steps") + 2]
        log = work / f"{name}.log"
        costs = {}
        scorer = work / f"{name}-scorer"
        if not stage_done(scorer, "train-scorer"):
            costs["train_scorer"] = run_stage(train_scorer_argv(
                train=demo.train, val=demo.val, run=scorer.name, runs_dir=work, proxy=demo.proxy, steps=steps,
                warmup_steps=demo.scorer_warmup_steps, seq_len=demo.scorer_seq_len, batch_size=demo.scorer_batch_size,
                seed=demo.seed, extra=(*flags, *pinned_threads())), log)
        if not (work / name / "selected" / "manifest.json").exists():
            costs["select"] = run_stage(select_argv(
                arm="bliss", train=demo.train, val=demo.val, budget=demo.budget, run=name, runs_dir=work,
                scorer_run=scorer, seq_len=demo.scorer_seq_len, seed=demo.seed, chunks=demo.chunks,
                exact_token_counts=True, extra=pinned_threads()), log)
        lm = work / f"{name}-lm"
        if not stage_done(lm, "pretrain"):
            costs["pretrain"] = run_stage(pretrain_argv(
                data=work / name / "selected", run=lm.name, runs_dir=work, size=demo.size, val=demo.val,
                seq_len=demo.seq_len, batch_tokens=demo.batch_tokens, steps=demo.steps, eval_every=demo.eval_every,
                seed=demo.seed, extra=pinned_threads()), log)
        if last_eval(lm) is None:
            run_stage(eval_argv(checkpoint=lm, val=demo.val), log)
        kept = kept_lines(work / name)
        reference_kept = kept if reference_kept is None else reference_kept
        share, jaccard = overlap(kept, reference_kept)
        results[name] = {
            "flags": VARIANTS[name], "outer_steps": steps, "costs": costs, **scorer_timing(scorer),
            "val_loss": last_eval(lm)["loss_val"],
            "speedup_vs_random": speedup(random_curve, pretrain_curve(lm)),
            f"overlap_with_{REFERENCE}": share, f"jaccard_with_{REFERENCE}": jaccard,
        }
        print(name, results[name], flush=True)
    record("bliss_routes", {"baseline": str(args.baseline), "variants": results})


if __name__ == "__main__":
    main()
