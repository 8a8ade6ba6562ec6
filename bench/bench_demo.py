"""``make demo`` as users run it: ``blissctl demo`` with no flags but a fresh ``--runs-dir``, timed back
to back, optionally against another commit's code on the same machine in the same run.

    .venv/bin/python bench/bench_demo.py                      # this tree, twice
    .venv/bin/python bench/bench_demo.py --before 28bcf23     # this tree, REV, this tree again

Each run starts from an empty run folder (so every stage runs) and is timed by ``wait4`` over the demo and
every stage process it starts: wall, user and system seconds. ``--before REV`` runs that commit's code
from a temporary git worktree with this environment, between two runs of this tree, so a drift in the
machine's load shows as a difference between this tree's two runs. The demo's own figures (validation
losses, the loss curves, the speed-up) must not change with the code's timing: the largest difference
between any run's and the first run's is recorded beside the times.

Recorded in bench/results/make_demo.json: ``runs.<label>.{wall_s,user_s,sys_s,stage_wall_s}``,
``after_over_before_wall_ratio`` (the mean of this tree's runs ÷ REV's) and ``figures_max_abs_diff``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import record, run_blissctl  # noqa: E402


def demo_run(tree: Path, runs_dir: Path, log: Path) -> dict:
    """One ``blissctl demo`` of ``tree``'s code into the empty ``runs_dir``: its times and its figures."""
    timing = run_blissctl(["demo", "--runs-dir", str(runs_dir)], log=log, tree=tree)
    comparison = json.loads((runs_dir / "demo-comparison.json").read_text())
    return {
        **{key: timing[key] for key in ("wall_s", "user_s", "sys_s", "max_rss_mb")},
        "stage_wall_s": {stage.split(":", 1)[1]: round(spent["wall_s"], 1)
                         for stage, spent in comparison["timings"].items()},
        "arms": {arm: {"val_loss": figures["val_loss"], "speedup_vs_random": figures["speedup_vs_random"],
                       "curve": figures["curve"]}
                 for arm, figures in comparison["arms"].items()},
    }


def figures_max_abs_diff(runs: list[dict]) -> float:
    """The largest difference of a validation loss, a curve point or the speed-up from the first run's."""
    def flat(run: dict) -> list[float]:
        values = []
        for arm in sorted(run["arms"]):
            figures = run["arms"][arm]
            values += [figures["val_loss"], figures["speedup_vs_random"]]
            values += [loss for _, loss in figures["curve"]]
        return values

    reference = flat(runs[0])
    worst = 0.0
    for run in runs[1:]:
        values = flat(run)
        if len(values) != len(reference):
            return float("inf")  # a different curve: not the same figures at all
        worst = max(worst, *(abs(a - b) for a, b in zip(values, reference, strict=True)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="a commit to time between two runs of this tree")
    args = parser.parse_args()

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plan: list[tuple[str, Path]] = [("this_tree_1", ROOT)]
        if args.before:
            before_tree = work / "before-tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(before_tree),
                            args.before], check=True)
            plan.append((f"before_{args.before}", before_tree))
        plan.append(("this_tree_2", ROOT))
        try:
            for label, tree in plan:
                runs[label] = demo_run(tree, work / label, work / f"{label}.log")
                print(f"{label}: {runs[label]['wall_s']} s wall, {runs[label]['user_s']} s user, "
                      f"{runs[label]['sys_s']} s system", flush=True)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)],
                               check=False)

    ordered = list(runs.values())
    figures: dict = {"command": " ".join(["bench/bench_demo.py", *sys.argv[1:]]),
                     "figures_max_abs_diff": figures_max_abs_diff(ordered)}
    this_tree = [runs["this_tree_1"]["wall_s"], runs["this_tree_2"]["wall_s"]]
    if args.before:
        figures["before"] = args.before
        figures["after_over_before_wall_ratio"] = round(sum(this_tree) / 2 / runs[f"before_{args.before}"]["wall_s"], 3)
    for run in ordered:  # the curves were for the comparison; the recorded file keeps the headline figures
        for arm in run["arms"].values():
            arm.pop("curve")
    figures["runs"] = runs
    record("make_demo", figures)


if __name__ == "__main__":
    main()
