"""``select --scorer bliss`` end to end against the score model's forward-only rate.

1. A 14m score model (random weights: throughput does not depend on them) and a BPE tokenizer trained on
   the pool are saved as a scorer run, as ``train-scorer`` leaves them.
2. Forward-only: every document's first ``--seq-len`` tokens, tokenised and padded into batches of
   ``--batch-size`` before the clock starts; only ``model(ids, mask)`` is timed. Twice: batches in pool
   order, and batches of the whole pool sorted by length (the least padding possible).
3. The scorer alone on pre-tokenised ``ShardBatch``es (sorting, padding, sub-batches included).
4. End to end: ``engine.select.stage.run_select`` with ``--scorer bliss`` (reader workers, tokenising, scoring,
   score files, top-k, writing the subset). docs/s over the whole call, and select's own scoring rate.
5. The same with ``--scorer random`` (documents still tokenised for their counts, no ids shipped): roughly
   the ceiling the reading, tokenising and writing pipeline allows on its own.

Goal: pipeline overhead (1 − end-to-end / forward-only) ≤ 20%. DSIR (PyPI ``data-selection``, hashed
n-gram importance resampling fitted on the embedded validation set) runs on the same pool with the same
budget (a share of documents), when that package is installed.

    .venv/bin/python bench/bench_bliss_select.py [--shards 1] [--threads 1] [--workers 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def run_dsir(shards: list[str], num_to_sample: int, num_proc: int, target: str | None = None) -> dict:
    """DSIR (hashed n-gram importance resampling, PyPI ``data-selection``) on the same pool and budget:
    fit on ``target`` (default: the embedded validation set), weigh every document, keep the top
    ``num_to_sample``."""
    try:
        from data_selection import HashedNgramDSIR
    except ImportError:
        return {"skipped": "PyPI data-selection is not installed"}
    from engine.data.sample import sample_val_path
    from engine.data.sources import read_documents

    def load(path):
        for doc in read_documents([Path(path)]):
            yield {"text": doc.text}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dsir = HashedNgramDSIR(list(shards), [target or str(sample_val_path())], cache_dir=f"{tmp}/cache",
                               raw_load_dataset_fn=load, target_load_dataset_fn=load, num_proc=num_proc)
        dsir.fit_importance_estimator(num_tokens_to_fit="auto")
        dsir.compute_importance_weights()
        dsir.resample(out_dir=f"{tmp}/out", num_to_sample=num_to_sample, cache_dir=f"{tmp}/resample", top_k=True)
        elapsed = time.perf_counter() - start
    docs = sum(1 for _ in read_texts_of(shards))
    return {"end_to_end_s": round(elapsed, 2), "docs_per_s": round(docs / elapsed, 1), "num_proc": num_proc,
            "kept": num_to_sample}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def read_texts_of(shards):
    from engine.data.sources import read_documents

    return read_documents([Path(s) for s in shards])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default="14m")
    parser.add_argument("--shards", type=int, default=1, help="embedded sample shards to use (1-4, 2,400 docs each)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget", default="20%", help="a share of the documents (DSIR samples documents)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda, as select runs)")
    parser.add_argument("--name", default="bliss_select", help="results file name")
    args = parser.parse_args()

    import glob

    import numpy as np
    import torch
    from _common import record

    from engine.bliss.artifacts import save_score_model
    from engine.bliss.score_model import ScoreModel
    from engine.data.collate import collate
    from engine.data.sample import sample_pool_glob
    from engine.data.sources import read_texts
    from engine.data.tokenizer import load_tokenizer, prefix_encoder, train_bpe_tokenizer
    from engine.models.families import build_causal_lm
    from engine.models.presets import model_preset, with_max_seq_len
    from engine.run_dir import RunDir, atomic_write_bytes
    from engine.runtime import autocast
    from engine.select.config import SelectConfig
    from engine.select.scorers.base import ShardBatch
    from engine.select.scorers.bliss import BlissScorer
    from engine.select.stage import run_select

    torch.set_num_threads(args.threads)
    budget_share = float(args.budget.rstrip("%")) / 100
    shards = sorted(glob.glob(sample_pool_glob()))[: args.shards]
    texts = read_texts(shards)
    figures = {"proxy": args.proxy, "docs": len(texts), "shards": len(shards), "seq_len": args.seq_len,
               "batch_size": args.batch_size, "threads": args.threads, "workers": args.workers, "device": args.device,
               "budget": args.budget}

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        scorer_run = RunDir.named("scorer", runs)
        scorer_run.create()
        start = time.perf_counter()
        tokenizer = train_bpe_tokenizer(texts, args.vocab_size)
        figures["tokenizer_training_s"] = round(time.perf_counter() - start, 2)
        atomic_write_bytes(scorer_run.tokenizer_path, tokenizer.to_str().encode())
        vocab = tokenizer.get_vocab_size()
        config = with_max_seq_len(model_preset(args.proxy), args.seq_len)
        model = ScoreModel.from_proxy(build_causal_lm(config, vocab, seed=0)).eval()
        device = torch.device(args.device)
        save_score_model(scorer_run.checkpoints / "score-model.pt", model, preset=args.proxy, vocab_size=vocab,
                         seq_len=args.seq_len, pad_id=1)

        # 2. forward only, on batches made before the clock starts
        tokens = prefix_encoder(load_tokenizer(scorer_run.tokenizer_path), args.seq_len)(texts)
        batches = [collate(tokens[i : i + args.batch_size], 1, device) for i in range(0, len(tokens), args.batch_size)]
        model.to(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast(device):
            for ids, mask in batches:
                model(ids, mask)
        synchronize(device)
        forward_s = time.perf_counter() - start
        figures["forward_only_docs_per_s"] = round(len(tokens) / forward_s, 1)
        print(f"forward only (pool order): {figures['forward_only_docs_per_s']} docs/s", flush=True)
        # the same, with the whole pool sorted by length first: the least padding any batching can reach
        by_length = sorted(tokens, key=len)
        batches = [collate(by_length[i : i + args.batch_size], 1, device)
                   for i in range(0, len(by_length), args.batch_size)]
        start = time.perf_counter()
        with torch.inference_mode(), autocast(device):
            for ids, mask in batches:
                model(ids, mask)
        synchronize(device)
        figures["forward_only_sorted_docs_per_s"] = round(len(tokens) / (time.perf_counter() - start), 1)
        print(f"forward only (sorted by length): {figures['forward_only_sorted_docs_per_s']} docs/s", flush=True)
        del batches

        # 3. the scorer alone, on pre-tokenised shard batches of the size select's readers send
        scorer = BlissScorer.load("scorer", runs, device=args.device, seq_len=args.seq_len, batch_size=args.batch_size)
        shard_batches = [ShardBatch("s", np.arange(i, min(i + 256, len(tokens)), dtype=np.uint32),
                                    np.zeros(min(256, len(tokens) - i), np.uint32), tokens[i : i + 256])
                         for i in range(0, len(tokens), 256)]
        start = time.perf_counter()
        for b in shard_batches:
            scorer.score(b)
        figures["scorer_on_tokens_docs_per_s"] = round(len(tokens) / (time.perf_counter() - start), 1)
        print(f"scorer on pre-tokenised batches: {figures['scorer_on_tokens_docs_per_s']} docs/s", flush=True)

        # 4. end to end
        select_config = SelectConfig(inputs=tuple(shards), budget=args.budget, unit="docs", scorer="bliss",
                                     scorer_run="scorer",
                                     runs_dir=str(runs), seq_len=args.seq_len, batch_size=args.batch_size,
                                     workers=args.workers, device=args.device)
        select_run = RunDir.named("select", runs)
        start = time.perf_counter()
        manifest = run_select(select_config, select_run)
        end_to_end_s = time.perf_counter() - start
        seen = manifest["documents"]["seen"]
        figures["end_to_end_docs_per_s"] = round(seen / end_to_end_s, 1)
        figures["end_to_end_s"] = round(end_to_end_s, 2)
        figures["docs_kept"] = manifest["documents"]["kept"]
        import orjson

        progress = [orjson.loads(line) for line in select_run.events_path.read_bytes().splitlines()]
        progress = [e for e in progress if e.get("kind") == "progress" and "docs_per_s" in e]
        if progress:
            figures["select_scoring_docs_per_s"] = progress[-1]["docs_per_s"]
        print(f"select end to end: {figures['end_to_end_docs_per_s']} docs/s", flush=True)

        # 5. the same pipeline with the random scorer: what reading, tokenising and writing allow alone
        random_config = SelectConfig(inputs=tuple(shards), budget=args.budget, unit="docs", scorer="random",
                                     runs_dir=str(runs), seq_len=args.seq_len, workers=args.workers,
                                     tokenizer=str(scorer_run.tokenizer_path))
        start = time.perf_counter()
        manifest = run_select(random_config, RunDir.named("select-random", runs))
        figures["random_scorer_end_to_end_docs_per_s"] = round(
            manifest["documents"]["seen"] / (time.perf_counter() - start), 1)
        print(f"select --scorer random end to end: {figures['random_scorer_end_to_end_docs_per_s']} docs/s",
              flush=True)

    figures["pipeline_overhead_vs_forward_only"] = round(
        1 - figures["end_to_end_docs_per_s"] / figures["forward_only_docs_per_s"], 3)
    figures["pipeline_overhead_vs_forward_only_sorted"] = round(
        1 - figures["end_to_end_docs_per_s"] / figures["forward_only_sorted_docs_per_s"], 3)
    figures["scorer_overhead_vs_forward_only"] = round(
        1 - figures["scorer_on_tokens_docs_per_s"] / figures["forward_only_docs_per_s"], 3)
    figures["goal_pipeline_overhead"] = 0.2
    figures["dsir"] = run_dsir(shards, int(round(figures["docs"] * budget_share)), args.workers + 1)
    if "docs_per_s" in figures["dsir"]:
        figures["bliss_vs_dsir_end_to_end"] = round(
            figures["end_to_end_docs_per_s"] / figures["dsir"]["docs_per_s"], 3)
    record(args.name, figures)


if __name__ == "__main__":
    main()
