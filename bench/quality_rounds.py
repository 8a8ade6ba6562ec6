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
rerun (``blissctl rounds --resume``). Results: bench/results/quality_rounds.json and a table on stdout:
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

from _common import POOL, RESULTS, record, run_command  # noqa: E402
from quality import split_val  # noqa: E402

from engine.eval.compare import speedup  # noqa: E402

ARMS = {"random": ["--scorer", "random"], "dsir": ["--scorer", "dsir"],
        "bliss-once": ["--scorer", "bliss", "--scorer-rounds", "1"], "bliss": ["--scorer", "bliss"]}


def run_arm(args, work: Path, arm: str, seed: int, target: Path, held_out: Path) -> dict:
    name = f"{arm}-s{seed}"
    result_file = work / name / "rounds-result.json"
    if not result_file.exists():
        argv = [sys.executable, "-m", "blissctl", "rounds", "--pool", str(args.pool), "--val", str(target),
                "--eval-val", str(held_out), "--rounds", str(args.rounds), "--round-tokens", args.round_tokens,
                "--budget", args.budget, "--scorer-steps", str(args.scorer_steps), "--proxy-steps", str(args.proxy_steps),
                "--seed", str(seed), "--run", name, "--runs-dir", str(work), "--threads", str(args.threads),
                *ARMS[arm], *args.extra]
        if (work / name / "experiment.json").exists():
            argv.append("--resume")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work-rounds")
    parser.add_argument("--pool", type=Path, default=POOL)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-tokens", default="200k")
    parser.add_argument("--budget", default="20%")
    parser.add_argument("--scorer-steps", type=int, default=30)
    parser.add_argument("--proxy-steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every stage (1: a shared machine)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more blissctl rounds flags")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    target, held_out = split_val(args.work)
    results: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            results.setdefault(arm, {})[seed] = run_arm(args, args.work, arm, seed, target, held_out)
            table = summary(results)
            record("quality_rounds", {"settings": {k: str(v) for k, v in vars(args).items()}, "arms": table})
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
