"""``select``: score every document of the pool, keep the best under a budget, write the subset.

Flow: resolve inputs and tokenizer → score each shard (worker processes read and tokenise, the scorer
runs here) → save one score file per shard (the resume point) → exact top-k under the budget from the
score files → write the kept documents → manifest and report.

Why scores go to disk before the top-k: a percentage budget is a share of a total that is only known
once every document has been seen, so no one-pass structure could drop a document early and still be
exact. Reading the compact score files back (14 bytes a document) costs far less than scoring, gives
resume for free, and lets the top-k keep only the kept set in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine import __version__
from engine.data.sample import sample_pool_glob
from engine.data.sources import SkipCounts, discover_shards, shard_labels
from engine.data.tokenizer import DEFAULT_VOCAB_SIZE, resolve_tokenizer, training_sample
from engine.data.workers import DocBatch, ShardDone, ShardFailed, ShardJob, ShardPipeline, TokenizeSpec
from engine.errors import UserError
from engine.run_dir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_with
from engine.runtime import Ranks, all_gather, barrier, broadcast, init_ranks
from engine.select.budget import Budget, parse_budget
from engine.select.noise import document_gumbels
from engine.select.scorers.base import RandomScorer, Scorer, ShardBatch
from engine.select.topk import TopKByWeight, rank_keys
from engine.select.writer import WriteJob, output_name, write_selected_shards

STAGE = "select"
HISTOGRAM_EDGES = np.round(np.linspace(0.0, 1.0, 51), 6)
PROGRESS_EVERY_S = 1.0
HISTOGRAM_EVERY_S = 5.0
SCORERS = ("random", "bliss", "perplexity")
UNITS = ("tokens", "docs")
RANDOM_SCORER_SEQ_LEN = 512


@dataclass(frozen=True, kw_only=True)
class SelectConfig:
    """Everything ``blissctl select`` needs; the CLI builds it from flags."""

    inputs: tuple[str, ...] = ()
    """Files, folders or globs of ``*.json.gz`` / ``*.jsonl.zst`` / ``*.jsonl``; empty: the embedded sample."""
    budget: str = "30%"
    """Share of the pool (``30%``) or an absolute amount (``2M``) in ``unit``."""
    unit: str = "tokens"
    """``tokens`` or ``docs``: what the budget counts."""
    scorer: str = "random"
    """``random`` (seeded control arm), ``bliss`` (a trained score model) or ``perplexity`` (keep what the
    warmed-up proxy of a train-scorer run finds least surprising: the classic baseline)."""
    scorer_run: str | None = None
    """For ``bliss`` and ``perplexity``: a train-scorer run name under ``runs_dir``, or a checkpoint path."""
    device: str = "cpu"
    """Where the score model runs: ``cpu`` or ``cuda``."""
    seq_len: int | None = None
    """Tokens of each document the scorer sees (its first ``seq_len``); default: the score model's
    training length for ``bliss``, 512 for ``random`` (where it only bounds exact token counting)."""
    chunks: int = 1
    """``bliss``: average the scores of up to this many ``seq_len`` chunks of each document."""
    batch_size: int = 64
    """Documents per score-model forward pass."""
    temperature: float = 0.0
    """Gumbel-top-k temperature: 0 keeps the top scores deterministically; above 0 samples."""
    seed: int = 0
    """Seeds the random scorer and the Gumbel noise (both hashed from document ids)."""
    workers: int = 2
    """Reader processes (decompress, parse, tokenise); 0 reads in the main process."""
    tokenizer: str | None = None
    """A tokenizer.json or hub id; default: train a byte-level BPE on the input, saved in the run."""
    vocab_size: int = DEFAULT_VOCAB_SIZE
    """Vocabulary of the default trained tokenizer."""
    exact_token_counts: bool = False
    """Tokenise whole documents for exact counts instead of extrapolating past the scored prefix."""
    resume: bool = False
    """Continue an interrupted run: shards already scored are not scored again."""
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise UserError(f"--unit {self.unit!r}: choose tokens or docs")
        if self.scorer not in SCORERS:
            raise UserError(f"--scorer {self.scorer!r}: choose one of {', '.join(SCORERS)}")
        if self.scorer in ("bliss", "perplexity") and not self.scorer_run:
            raise UserError(f"--scorer {self.scorer} needs --scorer-run NAME (a train-scorer run) or a checkpoint path")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"--temperature {self.temperature}: must be 0 or more")
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: must be 0 or more")
        if self.seq_len is not None and self.seq_len < 1:
            raise UserError(f"--seq-len {self.seq_len}: must be at least 1")
        if self.chunks < 1:
            raise UserError(f"--chunks {self.chunks}: must be at least 1")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be at least 1")
        parse_budget(self.budget)  # fail on the flag, before any work

    @property
    def parsed_budget(self) -> Budget:
        return parse_budget(self.budget)

    def scoring_identity(self) -> dict[str, Any]:
        """What the score files depend on: a resume must not mix scores made differently."""
        return {
            "scorer": self.scorer,
            "scorer_run": self.scorer_run,
            "seed": self.seed if self.scorer == "random" else None,
            "seq_len": self.seq_len,
            "chunks": self.chunks,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size if self.tokenizer is None else None,
            "exact_token_counts": self.exact_token_counts,
        }


@dataclass(frozen=True)
class SelectProgress:
    """What a progress display needs; ``phase`` is scoring, selecting, writing or done."""

    phase: str
    completed: float = 0.0
    total: float = 0.0
    docs_seen: int = 0
    docs_per_s: float = 0.0
    mb_per_s: float = 0.0
    tokens_per_s: float = 0.0
    skipped: int = 0


ProgressCallback = Callable[[SelectProgress], None]


@dataclass
class ShardScores:
    """One shard's score file: every parsed document's line, score, token count and source."""

    label: str
    path: str
    n_lines: int
    lines: np.ndarray  # uint32
    scores: np.ndarray  # float32
    tokens: np.ndarray  # uint32
    source_codes: np.ndarray  # uint16
    source_names: list[str]
    skips: dict[str, int]
    text_bytes: int
    n_estimated: int
    scorer: dict[str, Any] = field(default_factory=dict)

    @property
    def docs(self) -> int:
        return int(self.lines.size)

    @property
    def token_total(self) -> int:
        return int(self.tokens.sum(dtype=np.uint64))


def score_file(run_dir: RunDir, label: str) -> Path:
    return run_dir.scores / (label.replace("/", "__") + ".scores.npz")


def save_shard_scores(path: Path, shard: ShardScores) -> None:
    meta = {k: v for k, v in asdict(shard).items() if k not in ("lines", "scores", "tokens", "source_codes")}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f, lines=shard.lines, scores=shard.scores, tokens=shard.tokens, source_codes=shard.source_codes,
                meta=np.frombuffer(orjson.dumps(meta), np.uint8),
            )

    atomic_write_with(path, write)


def load_shard_scores(path: Path) -> ShardScores | None:
    """A score file, or None when it is missing or unreadable (the shard is then scored again)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            meta = orjson.loads(data["meta"].tobytes())
            return ShardScores(
                lines=data["lines"], scores=data["scores"], tokens=data["tokens"],
                source_codes=data["source_codes"], **meta,
            )
    except Exception:  # a damaged file is not fatal: it is only a cache of work that can be redone
        return None


def selection_values(shard: ShardScores, temperature: float, seed: int) -> np.ndarray:
    """What is ranked: the score, or with Gumbel-top-k log(score) + τ·Gumbel(seed, document id)."""
    if temperature <= 0:
        return shard.scores
    log_scores = np.log(np.maximum(shard.scores.astype(np.float64), 1e-30))
    return (log_scores + temperature * document_gumbels(seed, shard.label, shard.lines)).astype(np.float32)


def build_scorer(config: SelectConfig) -> Scorer:
    if config.scorer == "random":
        return RandomScorer(seed=config.seed, max_tokens=config.seq_len or RANDOM_SCORER_SEQ_LEN)
    if config.scorer == "perplexity":
        from engine.select.scorers.perplexity import PerplexityScorer

        return PerplexityScorer.load(
            config.scorer_run, Path(config.runs_dir), seq_len=config.seq_len, batch_size=config.batch_size,
            device=config.device,
        )
    from engine.select.scorers.bliss import BlissScorer

    return BlissScorer.load(
        config.scorer_run, Path(config.runs_dir), device=config.device, seq_len=config.seq_len,
        chunks=config.chunks, batch_size=config.batch_size,
    )


class _Rates:
    """Throughput since the start of scoring."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.docs = self.tokens = self.text_bytes = self.stored_bytes = self.skipped = 0

    def figures(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "docs_per_s": round(self.docs / elapsed, 1),
            "tokens_per_s": round(self.tokens / elapsed, 1),
            "mb_per_s": round(self.text_bytes / elapsed / 1e6, 3),
            "elapsed_s": round(elapsed, 2),
        }


def _check_run_state(config: SelectConfig, run_dir: RunDir, labels: list[str]) -> None:
    stored = run_dir.read_config().get(STAGE)
    if stored is None:
        return
    if not config.resume:
        raise UserError(
            f"run {run_dir.root} already has a selection; pass --resume to continue it or choose another --run"
        )
    identity = config.scoring_identity()
    for key, value in identity.items():
        if stored.get("scoring_identity", {}).get(key) != value:
            was = stored.get("scoring_identity", {}).get(key)
            raise UserError(f"--resume with different settings: {key} was {was!r}, now {value!r}")
    if stored.get("shards") != labels:
        raise UserError("--resume with different inputs: the run was started on other files")


def run_select(
    config: SelectConfig,
    run_dir: RunDir,
    *,
    progress: ProgressCallback | None = None,
    on_shard_scored: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole stage; returns the manifest. Under torchrun every rank calls this."""
    ranks = init_ranks(config.device)
    shards = discover_shards(list(config.inputs) or [sample_pool_glob()])
    labels = shard_labels(shards)
    report = progress or (lambda _: None)

    # Set-up on rank 0 (checks, tokenizer, config); other ranks wait and learn of any error.
    error = None
    if ranks.is_main:
        try:
            run_dir.create()
            _check_run_state(config, run_dir, labels)
            scorer = build_scorer(config)
            spec = getattr(scorer, "tokenizer_path", None) or config.tokenizer
            resolve_tokenizer(spec, run_dir.tokenizer_path, training_sample(shards), config.vocab_size)
            entry = {**_config_dict(config), "scoring_identity": config.scoring_identity(), "shards": labels}
            data = run_dir.read_config()
            data.update({"version": __version__, STAGE: entry})
            atomic_write_json(run_dir.config_path, data)
        except UserError as failure:
            error = str(failure)
    error = broadcast(ranks, error)
    if error:
        raise UserError(error)
    if not ranks.is_main:
        scorer = build_scorer(config)

    events = run_dir.events(STAGE, enabled=ranks.is_main)
    try:
        return _run(config, run_dir, ranks, shards, labels, scorer, events, report, on_shard_scored)
    except KeyboardInterrupt:
        events.emit("interrupted", message="interrupted; run again with --resume")
        raise
    except UserError as failure:
        events.emit("error", message=str(failure))
        raise
    finally:
        events.close()


def _config_dict(config: SelectConfig) -> dict[str, Any]:
    data = asdict(config)
    data["inputs"] = list(config.inputs)
    return data


def _run(config, run_dir, ranks: Ranks, shards, labels, scorer, events, report, on_shard_scored):
    started = time.time()
    mine = [i for i in range(len(shards)) if ranks.owns(i)]
    events.emit(
        "start", shards=len(shards), budget=config.budget, unit=config.unit, scorer=scorer.name,
        temperature=config.temperature, seed=config.seed, world_size=ranks.world_size, resume=config.resume,
    )

    # 1. Score every shard of this rank that has no valid score file yet.
    # Only a few figures per shard stay in memory; score arrays are read back one shard at a time, so
    # memory follows the kept set, not the pool.
    summaries: dict[int, tuple[int, int, int]] = {}  # shard -> (lines, documents, tokens)
    histogram = np.zeros(HISTOGRAM_EDGES.size - 1, np.int64)
    for index in mine:
        cached = load_shard_scores(score_file(run_dir, labels[index]))
        if cached is not None and cached.scorer == scorer.describe() and cached.label == labels[index]:
            summaries[index] = (cached.n_lines, cached.docs, cached.token_total)
            histogram += np.histogram(np.clip(cached.scores, 0, 1), HISTOGRAM_EDGES)[0]
    if summaries and ranks.is_main:
        events.emit("resumed", shards_reused=len(summaries))
    todo = [ShardJob(i, str(shards[i]), labels[i]) for i in mine if i not in summaries]
    _score_shards(config, run_dir, todo, scorer, events, report, on_shard_scored, summaries, histogram)

    def shard_scores(index: int) -> ShardScores:
        shard = load_shard_scores(score_file(run_dir, labels[index]))
        if shard is None:
            raise UserError(f"score file of {labels[index]} vanished from {run_dir.scores} during the run")
        return shard

    # 2. Totals over all ranks; then the global budget.
    local = {i: summaries[i] for i in mine}
    totals: dict[int, tuple[int, int, int]] = {}
    for part in all_gather(ranks, local):
        totals.update(part)
    n_lines = [totals[i][0] for i in range(len(shards))]
    total_docs = sum(t[1] for t in totals.values())
    total_tokens = sum(t[2] for t in totals.values())
    total_weight = total_tokens if config.unit == "tokens" else total_docs
    if total_docs == 0:
        raise UserError(f"no documents to select from in {len(shards)} input file(s): every line was skipped or empty")
    if sum(n_lines) >= 2**32:
        raise UserError("more than 4.29 billion input lines in one selection: split the pool into several runs")
    budget = config.parsed_budget
    budget_amount = budget.resolve(total_weight)
    if budget_amount <= 0:
        raise UserError(f"--budget {config.budget} of {total_weight} {config.unit} keeps nothing")
    shard_base = np.concatenate([[0], np.cumsum(n_lines, dtype=np.int64)])[:-1]

    # 3. Exact top-k: per rank over its own score files, merged on rank 0.
    report(SelectProgress("selecting"))
    topk = TopKByWeight(budget_amount)
    for index in mine:
        topk.push(*_keys_and_weights(shard_scores(index), index, shard_base, config))
    states = all_gather(ranks, topk.state())
    cutoff = None
    if ranks.is_main:
        merged = TopKByWeight(budget_amount)
        for state in states:
            merged.merge(state)
        cutoff = merged.cutoff
    cutoff = broadcast(ranks, cutoff)

    # 4. Write the kept documents of this rank's shards.
    report(SelectProgress("writing", 0, len(mine)))
    jobs, stats = [], {}
    for index in mine:
        shard = shard_scores(index)
        keys, _ = _keys_and_weights(shard, index, shard_base, config)
        kept = np.ones(keys.size, bool) if cutoff is None else keys < np.uint64(cutoff)
        stats[index] = _shard_stats(shard, kept, config)
        output = run_dir.selected / output_name(labels[index])
        stats[index]["output"] = output.name if kept.any() else None
        if kept.any():
            jobs.append(WriteJob(str(shards[index]), str(output), np.sort(shard.lines[kept])))
        else:
            output.unlink(missing_ok=True)  # a stale file from an earlier selection of this run
    if ranks.is_main:
        (run_dir.selected / "manifest.json").unlink(missing_ok=True)
    write_selected_shards(jobs, config.workers)
    report(SelectProgress("writing", len(mine), len(mine)))

    all_stats: dict[int, dict[str, Any]] = {}
    for part in all_gather(ranks, stats):
        all_stats.update(part)
    manifest = None
    if ranks.is_main:
        manifest = _manifest(config, run_dir, shards, labels, all_stats, scorer, budget_amount, total_weight, cutoff,
                             shard_base, ranks, elapsed_s=time.time() - started)
        atomic_write_json(run_dir.selected / "manifest.json", manifest)
        atomic_write_json(run_dir.report / "select.json", manifest)
        atomic_write_bytes(run_dir.report / "select.md", render_markdown(manifest).encode())
        events.emit(
            "histogram", edges=HISTOGRAM_EDGES.tolist(), counts=manifest["histogram"]["seen"],
            counts_kept=manifest["histogram"]["kept"], threshold=manifest["score_threshold"],
        )
        events.emit(
            "done", docs_seen=manifest["documents"]["seen"], docs_kept=manifest["documents"]["kept"],
            tokens_seen=manifest["tokens"]["seen"], tokens_kept=manifest["tokens"]["kept"],
            threshold=manifest["score_threshold"], elapsed_s=manifest["elapsed_s"],
        )
        report(SelectProgress("done"))
    barrier(ranks)
    return broadcast(ranks, manifest)


def _keys_and_weights(shard: ShardScores, index: int, shard_base: np.ndarray, config: SelectConfig):
    values = selection_values(shard, config.temperature, config.seed)
    keys = rank_keys(values, shard.lines.astype(np.uint64) + np.uint64(shard_base[index]))
    weights = shard.tokens if config.unit == "tokens" else np.ones(shard.lines.size, np.uint32)
    return keys, weights


def _score_shards(config, run_dir, todo, scorer, events, report, on_shard_scored, summaries, histogram) -> None:
    spec = TokenizeSpec(
        tokenizer_path=str(run_dir.tokenizer_path),
        max_tokens=scorer.max_tokens,
        ship_tokens=scorer.needs_tokens,
        exact_counts=config.exact_token_counts,
    )
    total_stored = float(sum(Path(job.path).stat().st_size for job in todo)) or 1.0
    rates = _Rates()
    parts: dict[int, dict[str, list]] = {}
    jobs = {job.index: job for job in todo}
    shards_done = len(summaries)
    shards_total = len(todo) + len(summaries)
    last_progress = last_histogram = time.perf_counter()

    def emit_progress() -> None:
        figures = rates.figures()
        events.emit(
            "progress", fraction=round(rates.stored_bytes / total_stored, 4), docs_seen=rates.docs,
            tokens_seen=rates.tokens, bytes_read=rates.text_bytes, skipped=rates.skipped,
            shards_done=shards_done, shards_total=shards_total, **figures,
        )
        report(SelectProgress(
            "scoring", rates.stored_bytes, total_stored, rates.docs, figures["docs_per_s"],
            figures["mb_per_s"], figures["tokens_per_s"], rates.skipped,
        ))

    pipeline = ShardPipeline(todo, spec, config.workers)
    try:
        for message in pipeline:
            if isinstance(message, DocBatch):
                job = jobs[message.shard_index]
                batch = ShardBatch(job.label, message.lines, message.n_tokens, message.token_lists())
                scores = np.asarray(scorer.score(batch), np.float32)
                part = parts.setdefault(message.shard_index, {"lines": [], "scores": [], "tokens": [], "codes": [], "bytes": 0, "est": 0})
                part["lines"].append(message.lines)
                part["scores"].append(scores)
                part["tokens"].append(message.n_tokens)
                part["codes"].append(message.source_codes)
                part["bytes"] += message.text_bytes
                part["est"] += message.n_estimated
                rates.docs += message.lines.size
                rates.tokens += int(message.n_tokens.sum(dtype=np.uint64))
                rates.text_bytes += message.text_bytes
                rates.stored_bytes += message.stored_bytes
                histogram += np.histogram(np.clip(scores, 0, 1), HISTOGRAM_EDGES)[0]
            elif isinstance(message, ShardDone):
                job = jobs[message.shard_index]
                part = parts.pop(message.shard_index, None) or {"lines": [], "scores": [], "tokens": [], "codes": [], "bytes": 0, "est": 0}
                shard = ShardScores(
                    label=job.label, path=job.path, n_lines=message.n_lines,
                    lines=_concat(part["lines"], np.uint32), scores=_concat(part["scores"], np.float32),
                    tokens=_concat(part["tokens"], np.uint32), source_codes=_concat(part["codes"], np.uint16),
                    source_names=message.source_names, skips=message.skips, text_bytes=part["bytes"],
                    n_estimated=part["est"], scorer=scorer.describe(),
                )
                save_shard_scores(score_file(run_dir, job.label), shard)
                summaries[message.shard_index] = (shard.n_lines, shard.docs, shard.token_total)
                del shard
                rates.stored_bytes += message.stored_bytes
                rates.skipped += sum(message.skips.values())
                shards_done += 1
                if on_shard_scored is not None:
                    on_shard_scored(job.label)
            elif isinstance(message, ShardFailed):
                raise UserError(message.message)
            now = time.perf_counter()
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                emit_progress()
            if now - last_histogram >= HISTOGRAM_EVERY_S:
                last_histogram = now
                events.emit("histogram", edges=HISTOGRAM_EDGES.tolist(), counts=histogram.tolist(), threshold=None)
    finally:
        pipeline.close()
    emit_progress()


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.empty(0, dtype)


def _shard_stats(shard: ShardScores, kept: np.ndarray, config: SelectConfig) -> dict[str, Any]:
    tokens = shard.tokens.astype(np.int64)
    by_source: dict[str, list[int]] = {}
    if len(shard.source_names) > 1:
        n_codes = len(shard.source_names)
        seen_docs = np.bincount(shard.source_codes, minlength=n_codes)
        kept_docs = np.bincount(shard.source_codes[kept], minlength=n_codes)
        seen_tokens = np.bincount(shard.source_codes, weights=tokens, minlength=n_codes)
        kept_tokens = np.bincount(shard.source_codes[kept], weights=tokens[kept], minlength=n_codes)
        for code, name in enumerate(shard.source_names):
            if seen_docs[code]:
                by_source[name or "(none)"] = [int(seen_docs[code]), int(kept_docs[code]), int(seen_tokens[code]), int(kept_tokens[code])]
    return {
        "label": shard.label,
        "path": shard.path,
        "lines": shard.n_lines,
        "documents": shard.docs,
        "tokens": int(tokens.sum()),
        "tokens_estimated_documents": shard.n_estimated,
        "text_bytes": shard.text_bytes,
        "skipped": shard.skips,
        "kept_documents": int(kept.sum()),
        "kept_tokens": int(tokens[kept].sum()),
        "min_kept_score": float(shard.scores[kept].min()) if kept.any() else None,
        "histogram_seen": np.histogram(np.clip(shard.scores, 0, 1), HISTOGRAM_EDGES)[0].tolist(),
        "histogram_kept": np.histogram(np.clip(shard.scores[kept], 0, 1), HISTOGRAM_EDGES)[0].tolist(),
        "by_source": by_source,
    }


def _manifest(config, run_dir, shards, labels, stats, scorer, budget_amount, total_weight, cutoff, shard_base, ranks,
              elapsed_s: float):
    order = range(len(shards))
    skipped = SkipCounts()
    for i in order:
        skipped.add(SkipCounts.from_dict(stats[i]["skipped"]))
    by_source: dict[str, list[int]] = {}
    for i in order:
        for name, figures in stats[i]["by_source"].items():
            acc = by_source.setdefault(name, [0, 0, 0, 0])
            for k in range(4):
                acc[k] += figures[k]
    min_scores = [stats[i]["min_kept_score"] for i in order if stats[i]["min_kept_score"] is not None]
    first_out = None
    if cutoff is not None:
        ordinal = int(cutoff) & 0xFFFFFFFF
        shard_index = int(np.searchsorted(shard_base, ordinal, side="right")) - 1
        first_out = {"shard": labels[shard_index], "line": ordinal - int(shard_base[shard_index])}
    docs_seen = sum(stats[i]["documents"] for i in order)
    tokens_seen = sum(stats[i]["tokens"] for i in order)
    return {
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run_dir.name,
        "scorer": scorer.describe(),
        "seed": config.seed,
        "temperature": config.temperature,
        "unit": config.unit,
        "budget": {"spec": config.budget, "amount": budget_amount, "pool_total": total_weight, "keeps_everything": cutoff is None},
        "documents": {"seen": docs_seen, "kept": sum(stats[i]["kept_documents"] for i in order)},
        "tokens": {
            "seen": tokens_seen,
            "kept": sum(stats[i]["kept_tokens"] for i in order),
            "counting": "exact" if config.exact_token_counts else f"exact up to {scorer.max_tokens} tokens, extrapolated beyond",
            "estimated_documents": sum(stats[i]["tokens_estimated_documents"] for i in order),
        },
        "skipped": {**skipped.as_dict(), "total": skipped.total},
        "score_threshold": min(min_scores) if min_scores else None,
        "first_excluded": first_out,
        "by_source": {
            name: {"documents_seen": f[0], "documents_kept": f[1], "tokens_seen": f[2], "tokens_kept": f[3]}
            for name, f in sorted(by_source.items(), key=lambda item: -item[1][2])
        },
        "histogram": {
            "edges": HISTOGRAM_EDGES.tolist(),
            "seen": np.sum([stats[i]["histogram_seen"] for i in order], axis=0).astype(int).tolist(),
            "kept": np.sum([stats[i]["histogram_kept"] for i in order], axis=0).astype(int).tolist(),
        },
        "inputs": [
            {k: stats[i][k] for k in ("label", "path", "lines", "documents", "tokens", "kept_documents", "kept_tokens", "skipped", "output")}
            for i in order
        ],
        "outputs": [stats[i]["output"] for i in order if stats[i]["output"]],
        "tokenizer": str(run_dir.tokenizer_path),
        "world_size": ranks.world_size,
        "elapsed_s": round(elapsed_s, 2),
    }


def render_markdown(manifest: dict[str, Any]) -> str:
    """The human-readable report: totals, sources, score histogram."""
    docs, tokens = manifest["documents"], manifest["tokens"]
    lines = [
        f"# Selection report: {manifest['run']}",
        "",
        f"- scorer: `{orjson.dumps(manifest['scorer']).decode()}`, temperature {manifest['temperature']}, seed {manifest['seed']}",
        f"- budget: {manifest['budget']['spec']} of {manifest['unit']} = {manifest['budget']['amount']:,}",
        f"- documents: {docs['kept']:,} kept of {docs['seen']:,} ({_share(docs['kept'], docs['seen'])})",
        f"- tokens: {tokens['kept']:,} kept of {tokens['seen']:,} ({_share(tokens['kept'], tokens['seen'])}); {tokens['counting']}",
        f"- skipped lines: {manifest['skipped']['total']:,} "
        + ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items() if k != "total" and v),
        f"- score threshold (lowest kept score): {manifest['score_threshold']}",
        "",
    ]
    if manifest["by_source"]:
        lines += ["| source | docs seen | docs kept | tokens seen | tokens kept | share kept |", "|---|---:|---:|---:|---:|---:|"]
        for name, f in manifest["by_source"].items():
            lines.append(
                f"| {name} | {f['documents_seen']:,} | {f['documents_kept']:,} | {f['tokens_seen']:,} | "
                f"{f['tokens_kept']:,} | {_share(f['tokens_kept'], f['tokens_seen'])} |"
            )
        lines.append("")
    lines += ["Score histogram (documents seen / kept):", "", "```"]
    edges, seen, kept = manifest["histogram"]["edges"], manifest["histogram"]["seen"], manifest["histogram"]["kept"]
    peak = max(max(seen), 1)
    for i, (s, k) in enumerate(zip(seen, kept, strict=True)):
        if s:
            bar = "#" * max(1, round(30 * s / peak))
            lines.append(f"{edges[i]:.2f}-{edges[i + 1]:.2f} {s:>9,} {k:>9,} {bar}")
    lines += ["```", ""]
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
