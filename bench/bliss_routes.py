"""Do the fast hypergradient routes select as well? Score models trained by each route, compared with
the demo's own (``--hypergrad graph``, exact z-solve) by what they select and what that trains.

On the demo's setting (the embedded sample, its 300 narrative passages, a tiny proxy, 100 warm-up
steps; ``blissctl demo`` must have run into ``--baseline`` first): for each variant, ``train-scorer``
with the variant's flags → ``select --scorer bliss --chunks 4`` 30% of the tokens → ``pretrain`` the
demo's tiny model on it → ``eval``. Reported per variant: train-scorer CPU seconds, the kept set's
overlap with the demo's BLISS selection (share of its documents, and Jaccard), validation loss and the
speed-up over the demo's random arm. The demo's passages both steer and measure here (as in the demo);
this is a check that the fast routes keep the selection, not a quality benchmark (bench/quality.py is).

    .venv/bin/python bench/bliss_routes.py --baseline runs          # after `blissctl demo --runs-dir runs`
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import record  # noqa: E402

from engine.data.sample import sample_pool_glob, sample_val_path  # noqa: E402
from engine.eval.compare import last_eval, pretrain_curve, speedup, stage_done  # noqa: E402
from engine.experiment import DemoSettings, eval_argv, pretrain_argv, select_argv, train_scorer_argv  # noqa: E402

VARIANTS = {
    "fd-z3": "--hypergrad fd --z-hvp fd --z-steps 3",
    "fd-z1": "--hypergrad fd --z-hvp fd --z-steps 1",
    "fd-z1-60": "--hypergrad fd --z-hvp fd --z-steps 1 --steps 60",
}


def kept_lines(run: Path) -> set[str]:
    """The kept documents of a selection, by the hash of their line (lines are copied byte for byte)."""
    out = set()
    for path in sorted((run / "selected").glob("*.jsonl.zst")):
        data = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
        out.update(hashlib.sha1(line).hexdigest() for line in data.splitlines() if line)
    return out


def scorer_timing(run: Path) -> dict:
    """train-scorer's own wall time (its done event) and its bilevel rate (outer steps/s, last step event)."""
    import orjson

    events = [orjson.loads(line) for line in (run / "events.jsonl").read_bytes().splitlines() if line.strip()]
    done = [e for e in events if e.get("stage") == "train-scorer" and e.get("kind") == "done"]
    steps = [e for e in events if e.get("stage") == "train-scorer" and e.get("kind") == "step"]
    return {"train_scorer_elapsed_s": done[-1]["elapsed_s"] if done else None,
            "outer_steps_per_s": steps[-1]["steps_per_s"] if steps else None,
            "z_cos_v_last": steps[-1].get("z_cos_v") if steps else None}


def run_stage(argv: list[str], log: Path) -> dict:
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "ab") as out:
        code = subprocess.call([sys.executable, "-m", "blissctl", *argv], stdout=out, stderr=subprocess.STDOUT,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"failed ({code}): blissctl {' '.join(argv)}; see {log}")
    return {"wall_s": round(time.perf_counter() - started, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the runs folder of a finished blissctl demo")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "routes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    demo = DemoSettings(train=sample_pool_glob(), val=str(sample_val_path()))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    baseline_kept = kept_lines(args.baseline / demo.run("bliss"))
    random_curve = pretrain_curve(args.baseline / demo.run("random-lm"))
    baseline_curve = pretrain_curve(args.baseline / demo.run("bliss-lm"))
    results = {"graph-z3 (the demo)": {
        "val_loss": (last_eval(args.baseline / demo.run("bliss-lm")) or {}).get("loss_val"),
        "speedup_vs_random": speedup(random_curve, baseline_curve), "overlap_with_demo": 1.0, "jaccard_with_demo": 1.0,
        **scorer_timing(args.baseline / demo.run("scorer")),
    }}
    for name in args.variants.split(","):
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
                seed=demo.seed, extra=tuple(flags)), log)
        if not (work / name / "selected" / "manifest.json").exists():
            costs["select"] = run_stage(select_argv(
                arm="bliss", train=demo.train, val=demo.val, budget=demo.budget, run=name, runs_dir=work,
                scorer_run=scorer, seq_len=demo.scorer_seq_len, seed=demo.seed, chunks=demo.chunks,
                exact_token_counts=True), log)
        lm = work / f"{name}-lm"
        if not stage_done(lm, "pretrain"):
            costs["pretrain"] = run_stage(pretrain_argv(
                data=work / name / "selected", run=lm.name, runs_dir=work, size=demo.size, val=demo.val,
                seq_len=demo.seq_len, batch_tokens=demo.batch_tokens, steps=demo.steps, eval_every=demo.eval_every,
                seed=demo.seed), log)
        if last_eval(lm) is None:
            run_stage(eval_argv(checkpoint=lm, val=demo.val), log)
        kept = kept_lines(work / name)
        results[name] = {
            "flags": VARIANTS[name], "outer_steps": steps, "costs": costs, **scorer_timing(scorer),
            "val_loss": last_eval(lm)["loss_val"],
            "speedup_vs_random": speedup(random_curve, pretrain_curve(lm)),
            "overlap_with_demo": round(len(kept & baseline_kept) / max(len(baseline_kept), 1), 4),
            "jaccard_with_demo": round(len(kept & baseline_kept) / max(len(kept | baseline_kept), 1), 4),
        }
        print(name, results[name], flush=True)
    record("bliss_routes", {"baseline": str(args.baseline), "variants": results})


if __name__ == "__main__":
    main()
