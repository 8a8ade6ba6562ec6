"""BLISS scoring throughput against DSIR on the same shard and budget, and what could make it faster.

The score model is a trained one (``--runs-dir``/``--scorer-run``, e.g. a finished ``blissctl demo``:
the ``tiny`` scorer and ``--chunks 4`` that the quality bench picked). On one pool shard, in one run:

1. End to end, as users run it (``python -m blissctl select`` in a subprocess: reader workers,
   tokenising, scoring, score files, top-k, writing the subset), ``--budget`` of the documents:
   ``--scorer bliss`` with the default thread plan and with ``--threads 2``, and ``--scorer dsir``
   (ours) for reference;
2. DSIR itself (PyPI ``data-selection``: fit on the same target, weigh, top-k resample) on the shard;
3. In process, the scorer alone on the shard's pre-tokenised documents, one candidate speed-up at a
   time: fp32 with the plan's threads as torch's intra-op threads (``fp32``) and as sub-batches side
   by side with one torch thread each (what select does on a CPU), bf16 autocast, int8 dynamic
   quantisation of the Linear layers, and one thread against the plan's. Each candidate's kept set (top share of documents by score) is compared
   with fp32's: a faster variant must keep ≥ 99% of it.

Recorded in bench/results/scoring.json: ``scoring.bliss_over_dsir_ratio`` (end-to-end docs/s of
``select --scorer bliss`` ÷ DSIR's, goal ≥ 1.0), ``scoring.bliss_scoring_phase_over_dsir_ratio`` (the
same from select's start event on, after its imports and model load, as DSIR's is timed after its
imports), ``scoring.select_bliss_by_setting`` (reader workers and the OpenMP wait policy) and ``scoring.variants.<name>`` (docs/s, speed-up over
fp32, kept-set overlap).

    .venv/bin/python bench/bench_scoring.py --runs-dir runs              # after blissctl demo --runs-dir runs
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import POOL, record, run_blissctl  # noqa: E402

from engine.eval.compare import read_events  # noqa: E402


def select_rate(argv: list[str], runs: Path, run: str, env: dict[str, str] | None = None) -> dict:
    """End to end (the process's wall time, start-up and imports included), and the scoring phase alone
    (select's ``done`` event: from its ``start`` event, after the score model is loaded)."""
    cost = run_blissctl(["select", *argv, "--runs-dir", str(runs), "--run", run], env=env)
    manifest = json.loads((runs / run / "selected" / "manifest.json").read_text())
    seen = manifest["documents"]["seen"]
    plan = next((line.strip() for line in cost["output"].splitlines() if "threads:" in line), None)
    phase_s = [e for e in read_events(runs / run, "select") if e.get("kind") == "done"][-1]["elapsed_s"]
    return {"docs_per_s": round(seen / cost["wall_s"], 1), "wall_s": cost["wall_s"], "docs": seen,
            "kept": manifest["documents"]["kept"], "cpu_s": cost["cpu_s"], "user_s": cost["user_s"],
            "sys_s": cost["sys_s"], "start_up_s": round(cost["wall_s"] - phase_s, 2),
            "scoring_phase_docs_per_s": round(seen / phase_s, 1), "plan": plan}


def kept_set(scores, share: float) -> set[int]:
    import numpy as np

    k = int(round(len(scores) * share))
    return set(np.argsort(-np.asarray(scores), kind="stable")[:k].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where the scorer run is")
    parser.add_argument("--scorer-run", default="demo-scorer")
    parser.add_argument("--shard", type=Path, default=POOL / "c4-train.00000-of-00008.jsonl.zst")
    parser.add_argument("--target", type=Path, default=None, help="DSIR's target (default: the scorer run's --val)")
    parser.add_argument("--budget", default="30%", help="a share of the documents")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--dsir-procs", type=int, default=None, help="DSIR's processes (default: the cores)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from bench_bliss_select import run_dsir

    from engine.data.sources import read_texts
    from engine.data.tokenizer import load_tokenizer
    from engine.runtime import available_cores, thread_plan
    from engine.select.scorers.base import ShardBatch
    from engine.select.scorers.bliss import BlissScorer

    scorer_config = json.loads((args.runs_dir / args.scorer_run / "config.json").read_text())
    target = args.target or Path(scorer_config.get("val") or scorer_config["train-scorer"]["val"])
    share = float(args.budget.rstrip("%")) / 100
    figures: dict = {"shard": args.shard.name, "scorer_run": args.scorer_run, "chunks": args.chunks,
                     "budget": args.budget, "target": str(target)}

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        (runs / args.scorer_run).symlink_to((args.runs_dir / args.scorer_run).resolve())
        common = ["--input", str(args.shard), "--budget", args.budget, "--unit", "docs"]  # select's default workers
        bliss_argv = [*common, "--scorer", "bliss", "--scorer-run", args.scorer_run, "--chunks", str(args.chunks)]
        select_rate(bliss_argv, runs, "warm-up")  # unrecorded: the page cache and the first imports
        figures["select_bliss"] = select_rate(
            [*common, "--scorer", "bliss", "--scorer-run", args.scorer_run, "--chunks", str(args.chunks)], runs, "bliss")
        print("select --scorer bliss:", figures["select_bliss"], flush=True)
        figures["select_bliss_threads_2"] = select_rate(
            [*common, "--scorer", "bliss", "--scorer-run", args.scorer_run, "--chunks", str(args.chunks),
             "--threads", "2"], runs, "bliss-threads-2")
        print("select --scorer bliss --threads 2:", figures["select_bliss_threads_2"], flush=True)
        # Reader processes beside the scorer's torch threads, on the same cores: how many, and whether
        # OpenMP's threads spin (its default) or sleep while they wait for a descheduled sibling.
        figures["select_bliss_by_setting"] = {}
        for name, flags, env in (("workers_2", ["--workers", "2"], None), ("workers_1", ["--workers", "1"], None),
                                 ("workers_0", ["--workers", "0"], None),
                                 ("workers_2_omp_passive", ["--workers", "2"], {"OMP_WAIT_POLICY": "PASSIVE"})):
            row = select_rate([*bliss_argv, *flags], runs, f"bliss-{name}", env=env)
            figures["select_bliss_by_setting"][name] = row
            print(f"select --scorer bliss, {name}:", row, flush=True)
        figures["select_dsir_ours"] = select_rate(
            [*common, "--scorer", "dsir", "--val", str(target),
             "--tokenizer", str(args.runs_dir / args.scorer_run / "tokenizer.json")], runs, "dsir")
        print("select --scorer dsir:", figures["select_dsir_ours"], flush=True)
        docs = figures["select_bliss"]["docs"]
        figures["dsir_reference"] = run_dsir([str(args.shard)], int(round(docs * share)),
                                             args.dsir_procs or available_cores(), target=str(target))
        print("DSIR (data-selection):", figures["dsir_reference"], flush=True)
    if "docs_per_s" in figures["dsir_reference"]:
        figures["bliss_over_dsir_ratio"] = round(
            figures["select_bliss"]["docs_per_s"] / figures["dsir_reference"]["docs_per_s"], 3)
        # DSIR's figure is timed in this process, after its imports; select's scoring phase is the like of it
        figures["bliss_scoring_phase_over_dsir_ratio"] = round(
            figures["select_bliss"]["scoring_phase_docs_per_s"] / figures["dsir_reference"]["docs_per_s"], 3)

    # 3. candidates, in process, on the shard's documents tokenised once
    scorer = BlissScorer.load(args.scorer_run, args.runs_dir, chunks=args.chunks)
    texts = read_texts([args.shard])
    tokenizer = load_tokenizer(scorer.tokenizer_path)
    tokens = [np.asarray(e.ids[: scorer.max_tokens], dtype=np.uint32)
              for e in tokenizer.encode_batch([t[:20_000] for t in texts])]
    batches = [ShardBatch("s", np.arange(i, min(i + 256, len(tokens)), dtype=np.uint32),
                          np.zeros(min(256, len(tokens) - i), np.uint32), tokens[i : i + 256])
               for i in range(0, len(tokens), 256)]
    plan_threads = thread_plan().threads
    fp32_model = scorer.model

    def timed(model, threads: int, autocast_dtype=None, sub_batch_threads: bool = False) -> dict:
        """``threads`` as torch's intra-op threads, or (``sub_batch_threads``) as sub-batches scored side
        by side with one torch thread each, what select does on a CPU (``ModelScorer.use_threads``)."""
        scorer.use_threads(threads if sub_batch_threads else 1)
        if not sub_batch_threads:
            torch.set_num_threads(threads)  # the alternative measured: torch's intra-op threads
        scorer.model = model
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            scorer.score(batches[0])  # warm-up, untimed: the first variant measured would pay it alone
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            scores = np.concatenate([scorer.score(b) for b in batches])
        elapsed = time.perf_counter() - start
        return {"docs_per_s": round(len(tokens) / elapsed, 1), "threads": threads, "scores": scores}

    variants = {"fp32": timed(fp32_model, plan_threads)}
    variants["fp32_sub_batches_side_by_side"] = timed(fp32_model, plan_threads, sub_batch_threads=True)
    variants["fp32_1_thread"] = timed(fp32_model, 1)
    variants["bf16_autocast"] = timed(fp32_model, plan_threads, torch.bfloat16)
    quantised = copy.deepcopy(fp32_model)  # the backbone's Linear layers; the one-output head stays fp32
    quantised.backbone = torch.ao.quantization.quantize_dynamic(quantised.backbone, {torch.nn.Linear},
                                                                dtype=torch.qint8)
    variants["int8_dynamic"] = timed(quantised, plan_threads)
    reference = kept_set(variants["fp32"]["scores"], share)
    figures["variants"] = {}
    for name, row in variants.items():
        kept = kept_set(row.pop("scores"), share)
        row["speedup_over_fp32"] = round(row["docs_per_s"] / variants["fp32"]["docs_per_s"], 3)
        row["kept_overlap_with_fp32"] = round(len(kept & reference) / max(len(reference), 1), 4)
        figures["variants"][name] = row
        print(name, row, flush=True)
    record("scoring", {"command": " ".join(sys.argv), "scoring": figures})


if __name__ == "__main__":
    main()
