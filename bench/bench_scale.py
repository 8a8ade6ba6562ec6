"""Select at scale (README "At scale"): what ``--engine ray`` costs against the local engine on the same
cores, and what a ``--merge`` of shard jobs' score files costs as the pool grows.

1. ``select --scorer random`` on the first ``--ray-shards`` pool shards with ``--engine local
   --workers 2`` and with ``--engine ray`` (a local Ray cluster on the same cores), interleaved
   ``--rounds`` times, as users run them (``python -m blissctl``). Figures: end-to-end wall time (Ray's
   includes starting its cluster), the scoring phase's docs/s from the run's own progress events, and
   the CPU seconds of every process each run starts (Ray's cluster included); the ratios ray ÷ local
   (best of the rounds). The subsets must be identical.
2. The whole pool scored once by ``--num-shards 2`` shard jobs; then, for the first 1, 2, 4 and 8
   shards, a ``--merge`` from copies of those score files, and a single-process ``select`` of the same
   inputs, each in a fresh process (its own peak RSS, VmHWM, without its reader and writer workers').
   Figures: merge wall time, peak RSS of both, their growth per kept document (least squares; goal ≤
   32 bytes, as the single-process top-k), and the top-k structure's own peak per kept document
   replayed under tracemalloc (``bench_select.topk_peak_bytes``). Merge subsets must equal the
   single-process subsets.

    .venv/bin/python bench/bench_scale.py [--ray-shards 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson
from _common import RESULTS, kept_lines, pool_shards, record, run_blissctl, run_command
from bench_select import peak_rss_mb, topk_peak_bytes


def child_select(argv: list[str]) -> None:
    """``blissctl ARGV`` in this process, then its wall time and this process's own peak RSS (VmHWM) as the
    last line: wait4's ru_maxrss would report the parent's larger RSS, inherited at fork."""
    from blissctl.cli import app

    started = time.perf_counter()
    app(argv, standalone_mode=False)
    print(json.dumps({"wall_s": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak_rss_mb(), 2)}))


def cpu_of_tree(argv: list[str]) -> dict:
    """``blissctl ARGV`` to completion, with the CPU seconds of it and of every process under it: a local
    Ray cluster's GCS, raylet, workers and actors descend from the driver but are not waited for by it,
    so wait4 would miss their time. Every process's own CPU time (not its children's: no double count)
    is sampled every 0.2 s and its last sample kept, so one that exits between samples loses at most 0.2 s."""
    import os
    import subprocess

    import psutil

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "blissctl", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    root = psutil.Process(proc.pid)
    seen: dict[int, float] = {}
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            processes = []
        for process in processes:
            try:
                times = process.cpu_times()
                seen[process.pid] = times.user + times.system
            except psutil.Error:
                pass
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): blissctl {' '.join(argv)}")
    return {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(sum(seen.values()), 1),
            "processes": len(seen)}


def measured_select(argv: list[str]) -> dict:
    done = run_command([sys.executable, __file__, "--child", *argv])
    return {**json.loads(done["output"].strip().splitlines()[-1]), "cpu_s": done["cpu_s"]}


def last_progress(run: Path) -> dict:
    events = [orjson.loads(line) for line in (run / "events.jsonl").read_bytes().splitlines()]
    return [e for e in events if e["kind"] == "progress"][-1]


def slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)


def ray_against_local(tmp: Path, tokenizer: Path, shards: list[Path], rounds: int) -> dict:
    common = ["select", *[a for s in shards for a in ("--input", str(s))], "--tokenizer", str(tokenizer),
              "--budget", "30%", "--runs-dir", str(tmp / "runs")]
    rows: dict[str, list[dict]] = {"local": [], "ray": []}
    for round_ in range(rounds):
        for engine in ("local", "ray"):
            name = f"{engine}-{round_}"
            timing = cpu_of_tree([*common, "--run", name, "--engine", engine, "--workers", "2"])
            progress = last_progress(tmp / "runs" / name)
            rows[engine].append({**timing, "scoring_docs_per_s": progress["docs_per_s"],
                                 "docs": progress["docs_seen"]})
            print(engine, rows[engine][-1], flush=True)
    identical = kept_lines(tmp / "runs" / "local-0") == kept_lines(tmp / "runs" / "ray-0")

    def best(engine: str, key: str, pick) -> float:
        return pick(r[key] for r in rows[engine])

    docs = rows["local"][0]["docs"]
    local_wall, ray_wall = best("local", "wall_s", min), best("ray", "wall_s", min)
    local_rate, ray_rate = best("local", "scoring_docs_per_s", max), best("ray", "scoring_docs_per_s", max)
    return {
        "shards": len(shards), "documents": docs, "rounds": rows, "identical_subsets": identical,
        "end_to_end_docs_per_s": {"local": round(docs / local_wall), "ray": round(docs / ray_wall)},
        "scoring_docs_per_s": {"local": local_rate, "ray": ray_rate},
        "ray_over_local_end_to_end": round(local_wall / ray_wall, 3),
        "ray_over_local_scoring": round(ray_rate / local_rate, 3),
        # CPU seconds a document, all processes: the overhead that wall time on a shared machine blurs
        "cpu_us_per_doc": {"local": round(1e6 * best("local", "cpu_s", min) / docs),
                           "ray": round(1e6 * best("ray", "cpu_s", min) / docs)},
        "ray_cpu_over_local_cpu": round(best("ray", "cpu_s", min) / best("local", "cpu_s", min), 3),
    }


def merge_against_pool_size(tmp: Path, tokenizer: Path, shards: list[Path]) -> dict:
    runs = tmp / "runs"
    # --workers 2 (the default): the subset is written by worker processes, so the main process's own peak
    # (VmHWM) is what the top-k and the score files cost, as in bench_select.py.
    common = ["--tokenizer", str(tokenizer), "--budget", "30%", "--runs-dir", str(runs), "--workers", "2"]
    for index in range(2):  # the whole pool, scored once by two shard jobs
        run_blissctl(["select", *[a for s in shards for a in ("--input", str(s))], *common, "--run", "scored",
                      "--shard-index", str(index), "--num-shards", "2", "--no-merge-when-done"])
    from engine.run_dir import RunDir

    rows = []
    for size in (1, 2, 4, 8):
        inputs = [a for s in shards[:size] for a in ("--input", str(s))]
        merged = runs / f"merge-{size}"
        (merged / "scores").mkdir(parents=True)
        shutil.copy(runs / "scored" / "tokenizer.json", merged / "tokenizer.json")
        for shard in shards[:size]:
            name = f"{shard.name}.scores.npz"
            shutil.copy(runs / "scored" / "scores" / name, merged / "scores" / name)
        merge = measured_select(["select", *inputs, *common, "--run", merged.name, "--merge"])
        single = measured_select(["select", *inputs, *common, "--run", f"single-{size}"])
        manifest = orjson.loads((merged / "selected" / "manifest.json").read_bytes())
        rows.append({
            "shards": size, "documents": manifest["documents"]["seen"], "kept": manifest["documents"]["kept"],
            "merge_wall_s": merge["wall_s"], "merge_cpu_s": merge["cpu_s"], "merge_peak_rss_mb": merge["peak_rss_mb"],
            "single_wall_s": single["wall_s"], "single_peak_rss_mb": single["peak_rss_mb"],
            "topk_peak_bytes_per_kept_doc": round(topk_peak_bytes(RunDir(merged), manifest) / manifest["documents"]["kept"], 1),
            "identical_to_single": kept_lines(merged) == kept_lines(runs / f"single-{size}"),
        })
        print(rows[-1], flush=True)
    kept = [r["kept"] for r in rows]
    return {
        "by_pool_size": rows,
        "merge_rss_growth_bytes_per_kept_doc": round(slope(kept, [r["merge_peak_rss_mb"] * 2**20 for r in rows]), 1),
        "single_rss_growth_bytes_per_kept_doc": round(slope(kept, [r["single_peak_rss_mb"] * 2**20 for r in rows]), 1),
        "merge_seconds_per_million_docs": round(slope([r["documents"] / 1e6 for r in rows],
                                                      [r["merge_wall_s"] for r in rows]), 2),
        "goal": "merge memory per kept document unchanged from the single-process top-k, <= 32 bytes",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ray-shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--part", choices=("all", "ray", "merge"), default="all",
                        help="measure one part again; the other's recorded figures are kept")
    if sys.argv[1:2] == ["--child"]:
        return child_select(sys.argv[2:])
    args = parser.parse_args()
    from engine.data.tokenizer import resolve_tokenizer, training_sample

    shards = pool_shards()
    previous = RESULTS / "scale.json"
    figures = json.loads(previous.read_text()) if previous.exists() and args.part != "all" else {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokenizer = tmp / "tokenizer.json"
        resolve_tokenizer(None, tokenizer, training_sample(shards))
        if args.part in ("all", "ray"):
            figures["ray_engine"] = ray_against_local(tmp / "ray", tokenizer, shards[: args.ray_shards], args.rounds)
        if args.part in ("all", "merge"):
            figures["merge"] = merge_against_pool_size(tmp / "merge", tokenizer, shards)
    record("scale", {"ray_engine": figures.get("ray_engine"), "merge": figures.get("merge")})


if __name__ == "__main__":
    main()
