"""Multi-round BLISS against its controls, with the same model, seeds and pretraining tokens:

  random      blissctl rounds --scorer random        (random rounds: the control arm)
  dsir        blissctl rounds --scorer dsir          (DSIR toward the target, every round)
  bliss-once  blissctl rounds --scorer-rounds 1      (single-round BLISS: the score model is trained in
                                                       round 1 only and selects every later round)
  bliss       blissctl rounds                        (multi-round BLISS: the score model is trained every
                                                       round against the latest model)

On ../shared/corpus/pool/ (8 shards; ``--rounds 3`` splits it by shard into 4 parts of 2) with the 978
narrative passages split alternately into a target half (``--val``: what train-scorer and DSIR aim at)
and an evaluation half (``--eval-val``: only ever used to measure the models), as bench/quality.py does.
Each arm runs for every ``--seeds``; an arm-seed is one rounds experiment in WORK/ARM-sSEED, reused on a
rerun (``blissctl rounds --resume``).

A second target (``--target-source SOURCE --holdout GLOB``): documents of one ``source`` taken from shards
that are not in ``--pool`` (so held out of it), split alternately into a target and an evaluation half;
its experiments are WORK/B-ARM-sSEED. With both targets run, the kept sets of each round are compared
across targets (Jaccard): a method that responds to its target keeps different documents for different
targets. Results: bench/results/quality_rounds.json and a table on stdout:
final loss of each round's decayed evaluation branch, speed-up over random and over DSIR (tokens each
needs to reach the reference's final main-line loss), seed spread, composition per round, and the
selection CPU-seconds beside the pretraining CPU-seconds.

    .venv/bin/python bench/quality_rounds.py [--rounds 3] [--round-tokens 200k] [--seeds 0 1] [--arms ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import (  # noqa: E402
    SELECTION_SHARDS,
    add_target_arguments,
    kept_lines,
    overlap,
    record,
    run_command,
    target_files,
)

from engine.eval.compare import speedup  # noqa: E402

ARMS = {"random": ["--scorer", "random"], "dsir": ["--scorer", "dsir"],
        "bliss-once": ["--scorer", "bliss", "--scorer-rounds", "1"], "bliss": ["--scorer", "bliss"]}


def cross_target_overlap(work: Path, arms: list[str], seed: int, rounds: int) -> dict:
    """Jaccard of each round's kept set for target A against target B, per arm (round 0 is random for
    both and leaves out)."""
    out = {}
    for arm in arms:
        a, b = work / f"{arm}-s{seed}", work / f"B-{arm}-s{seed}"
        if not ((a / "rounds-result.json").exists() and (b / "rounds-result.json").exists()):
            continue
        out[arm] = {r: overlap(kept_lines(b / f"r{r}-select"), kept_lines(a / f"r{r}-select"))[1]
                    for r in range(1, rounds + 1)}
    return out


def run_arm(args, work: Path, arm: str, seed: int, target: Path, held_out: Path, prefix: str = "") -> dict:
    name = f"{prefix}{arm}{args.tag}-s{seed}"
    result_file = work / name / "rounds-result.json"
    if not result_file.exists():
        argv = [sys.executable, "-m", "blissctl", "rounds", "--pool", str(args.pool), "--val", str(target),
                "--eval-val", str(held_out), "--rounds", str(args.rounds), "--round-tokens", args.round_tokens,
                "--budget", args.budget, "--scorer-steps", str(args.scorer_steps), "--proxy-steps", str(args.proxy_steps),
                "--eval-points", str(args.eval_points),
                "--seed", str(seed), "--run", name, "--runs-dir", str(work), "--threads", str(args.threads),
                *ARMS[arm], *args.extra]
        if (work / name / "experiment.json").exists():
            argv.append("--resume")
        shared = work / f"{prefix}bliss-s{seed}"  # round 0 is the same for every variant: start from the base's
        if args.tag and (shared / "rounds-result.json").exists() and "--round0-from" not in args.extra:
            argv += ["--round0-from", str(shared)]
        print(f"== {name}", flush=True)
        cost = run_command(argv, log=work / f"{name}.log", threads=args.threads)
        if not result_file.exists():
            raise SystemExit(f"{name} failed; see {work / (name + '.log')}")
        print(f"   {cost['wall_s']:.0f} s wall, {cost['cpu_s']:.0f} CPU-s", flush=True)
    return orjson.loads(result_file.read_bytes())


def summary(results: dict[str, dict[int, dict]]) -> dict:
    out = {}
    reference = {seed: r["curve"] for seed, r in results.get("random", {}).items()}
    dsir = {seed: r["curve"] for seed, r in results.get("dsir", {}).items()}
    for arm, by_seed in results.items():
        finals = [r["final_val_loss"] for r in by_seed.values()]
        rows = {}
        for seed, r in by_seed.items():
            rows[seed] = {
                "final_val_loss": r["final_val_loss"], "total_tokens": r["total_tokens"],
                "speedup_vs_random": speedup(reference[seed], r["curve"]) if seed in reference else None,
                "speedup_vs_dsir": speedup(dsir[seed], r["curve"]) if seed in dsir else None,
                "decayed": r["decayed"],
                "selection_cpu_s": round(sum(x["selection_cpu_s"] or 0 for x in r["rounds"]), 1),
                "pretrain_cpu_s": round(sum(x["pretrain_cpu_s"] or 0 for x in r["rounds"]), 1),
                "composition": [{"round": x["round"], "top": dict(list(x["composition"].items())[:6])}
                                for x in r["rounds"]],
                "drift": [x["drift_spearman"] for x in r["rounds"]],
            }
        out[arm] = {"seeds": rows, "final_val_loss_mean": statistics.fmean(finals),
                    "seed_spread": (max(finals) - min(finals)) if len(finals) > 1 else None}
    return out


def tuning_table(work: Path, rounds: int) -> dict:
    """Every tuning attempt in WORK (a tagged ``bliss`` experiment, ``--tag``), per target and seed, beside
    the untagged arms of that target and seed: the flags it changed, per-round decayed losses, speed-up
    over random and DSIR, selection CPU-seconds; with both targets run, the cross-target Jaccard."""
    from engine.rounds import recorded_settings, result_so_far

    rows = []
    for exp in sorted(work.glob("*bliss*-s*")):
        if not exp.is_dir():
            continue
        prefix = "B-" if exp.name.startswith("B-") else ""
        arm_tag, seed = exp.name[len(prefix):].rsplit("-s", 1)
        result = result_so_far(exp)  # also a screened attempt, stopped after round 1
        if result is None or len(result["rounds"]) < 2:
            continue
        complete = result["complete"]
        base = work / f"{prefix}bliss-s{seed}"
        flags = {}
        if base != exp and (base / "experiment.json").exists():
            ours = recorded_settings(orjson.loads((exp / "experiment.json").read_bytes()))
            theirs = recorded_settings(orjson.loads((base / "experiment.json").read_bytes()))
            flags = {k: ours[k] for k in ours if k != "round0_from" and ours[k] != theirs.get(k)}

        def curve(arm, prefix=prefix, seed=seed):
            path = work / f"{prefix}{arm}-s{seed}" / "rounds-result.json"
            return orjson.loads(path.read_bytes())["curve"] if path.exists() else None

        random_curve, dsir_curve = curve("random"), curve("dsir")
        other = work / (exp.name[2:] if prefix else "B-" + exp.name)
        jaccard = None
        if prefix == "" and other.is_dir():
            jaccard = [round(overlap(kept_lines(other / f"r{r}-select"), kept_lines(exp / f"r{r}-select"))[1], 3)
                       for r in range(1, rounds + 1)
                       if (other / f"r{r}-select" / "selected" / "manifest.json").exists()
                       and (exp / f"r{r}-select" / "selected" / "manifest.json").exists()]
        rows.append({
            "experiment": exp.name, "target": "B" if prefix else "A", "seed": int(seed), "variant": arm_tag,
            "flags": flags, "decayed": [round(x["val_loss"], 4) for x in result["rounds"]],
            "final_val_loss": result["final_val_loss"] if complete else None,
            "stopped_after_round": None if complete else len(result["rounds"]) - 1,
            "speedup_vs_random": speedup(random_curve, result["curve"]) if random_curve and complete else None,
            "speedup_vs_dsir": speedup(dsir_curve, result["curve"]) if dsir_curve and complete else None,
            "dsir_same_round_val_loss": (orjson.loads((work / f"{prefix}dsir-s{seed}" / "rounds-result.json").read_bytes())
                                         ["rounds"][len(result["rounds"]) - 1]["val_loss"] if dsir_curve else None),
            "selection_cpu_s": round(sum(x["selection_cpu_s"] or 0 for x in result["rounds"]), 1),
            "cross_target_jaccard": jaccard,
        })
    return {"attempts": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work-rounds")
    parser.add_argument("--pool", type=Path, default=Path(SELECTION_SHARDS),
                        help="the candidate pool, for both targets (default: the first four shards, as every "
                             "recorded run; the second target's documents come from the other four)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-tokens", default="200k")
    parser.add_argument("--budget", default="20%")
    parser.add_argument("--scorer-steps", type=int, default=30)
    parser.add_argument("--proxy-steps", type=int, default=100)
    parser.add_argument("--eval-points", type=int, default=4, help="main-line evaluations a round (the curves)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every stage (1: a shared machine)")
    add_target_arguments(parser)
    parser.add_argument("--tag", default="", help="a variant's suffix to its experiments' names (with --extra)")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: summarise the arm-seeds already finished in WORK")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more blissctl rounds flags")
    parser.add_argument("--tuning", action="store_true",
                        help="run nothing: table every tuning attempt (tagged bliss experiment) in WORK")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.tuning:
        table = tuning_table(args.work, args.rounds)
        record("quality_rounds_tuning", {"settings": {"work": str(args.work), "rounds": args.rounds}, **table})
        print(f"{'experiment':<28} {'flags':<44} {'decayed loss per round':<32} {'×rand':>6} {'×DSIR':>6} "
              f"{'DSIR':>7} {'sel CPU-s':>9} {'Jaccard A/B'}")
        for row in table["attempts"]:
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in row["flags"].items()) or "(the base arm)"
            print(f"{row['experiment']:<28} {flags:<44} {' '.join(f'{x:.4f}' for x in row['decayed']):<32} "
                  f"{_x(row['speedup_vs_random']):>6} {_x(row['speedup_vs_dsir']):>6} "
                  f"{row['dsir_same_round_val_loss'] or 0:>7.4f} {row['selection_cpu_s']:>9.0f} "
                  f"{row['cross_target_jaccard'] or ''}")
        return
    prefix = "B-" if args.target_source else ""
    target, held_out = target_files(args, args.work)
    results: dict[str, dict[int, dict]] = {}
    name = "quality_rounds" + (f"_B_{args.target_source}" if args.target_source else "") + args.tag.replace("-", "_")
    for seed in args.seeds:
        for arm in args.arms:
            if args.summary_only and not (args.work / f"{prefix}{arm}{args.tag}-s{seed}" / "rounds-result.json").exists():
                continue
            results.setdefault(arm + args.tag, {})[seed] = run_arm(args, args.work, arm, seed, target, held_out, prefix)
            table = summary(results)
            extra = {"cross_target_jaccard": cross_target_overlap(args.work, args.arms, seed, args.rounds)} \
                if args.target_source else {}
            record(name, {"settings": {k: str(v) for k, v in vars(args).items()}, "arms": table, **extra})
    table = summary(results)
    print(f"{'arm':<11} {'seed':>4} {'final loss':>10} {'×random':>8} {'×DSIR':>7} {'select CPU-s':>12} {'pretrain CPU-s':>14}")
    for arm, entry in table.items():
        for seed, row in entry["seeds"].items():
            print(f"{arm:<11} {seed:>4} {row['final_val_loss']:>10.4f} {_x(row['speedup_vs_random']):>8} "
                  f"{_x(row['speedup_vs_dsir']):>7} {row['selection_cpu_s']:>12.0f} {row['pretrain_cpu_s']:>14.0f}")
        if entry["seed_spread"] is not None:
            print(f"{arm:<11} mean {entry['final_val_loss_mean']:.4f}, seed spread {entry['seed_spread']:.4f}")


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}×"


if __name__ == "__main__":
    main()
