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

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.data.formats import MEGATRON_PREFIX, output_format
from engine.data.locations import as_location, stored_size
from engine.data.sample import sample_pool_glob
from engine.data.sources import discover_shards, shard_labels
from engine.data.tokenizer import resolve_tokenizer, training_sample
from engine.data.workers import DocBatch, ShardDone, ShardFailed, ShardJob, ShardPipeline, TokenizeSpec
from engine.errors import UserError
from engine.run_dir import (
    STAGE_OUTPUTS,
    EventLog,
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    failure_message,
)
from engine.runtime import Runtime, all_gather, barrier, broadcast, start_runtime, stop_runtime
from engine.select.config import ProgressCallback, SelectConfig, SelectProgress
from engine.select.manifest import (
    HISTOGRAM_EDGES,
    ManifestBuilder,
    SelectionFacts,
    ShardSummary,
    render_markdown,
    score_histogram,
)
from engine.select.noise import selection_values
from engine.select.score_files import ShardScores, load_shard_scores, save_shard_scores, score_file
from engine.select.scorers import scorer_entry
from engine.select.scorers.base import Scorer, ScorerContext, ShardBatch
from engine.select.topk import TopKByWeight, rank_keys
from engine.select.writer import (
    OUTPUT_PATTERNS,
    WriteJob,
    finish_outputs,
    shard_output,
    write_selected_shards,
)

if TYPE_CHECKING:
    from engine.select.shards import Share, ShareResult

STAGE = "select"
PROGRESS_EVERY_S = 1.0
HISTOGRAM_EVERY_S = 5.0


def build_scorer(config: SelectConfig, run_dir: RunDir, shards: list[Path]) -> Scorer:
    """The scorer ``config`` names, from the registry (``engine.select.scorers``)."""
    return scorer_entry(config.scorer).build(ScorerContext(config=config, run_dir=run_dir, shards=shards))


def run_select(
    config: SelectConfig,
    run_dir: RunDir,
    *,
    progress: ProgressCallback | None = None,
    on_shard_scored: Callable[[str], None] | None = None,
) -> dict[str, Any] | ShareResult:
    """Run the whole stage; returns the manifest. Under torchrun every rank calls this: it joins the
    process group torchrun set up and leaves it before returning.

    With ``config.shard_index`` this is one independent shard job (``engine.select.shards``): it
    scores its share and returns a ``ShareResult``, which holds the manifest if the job was the last
    share to finish and merged."""
    if config.shard_index is not None:
        from engine.select.shards import run_share

        return run_share(config, run_dir, progress=progress, on_shard_scored=on_shard_scored)
    return run_whole_selection(config, run_dir, progress=progress, on_shard_scored=on_shard_scored)


def run_whole_selection(config: SelectConfig, run_dir: RunDir, *, progress: ProgressCallback | None = None,
                        on_shard_scored: Callable[[str], None] | None = None,
                        lock_wait_s: float = 0.0) -> dict[str, Any]:
    """Score what has no score file yet (nothing, for ``--merge``), select and write: the stage as one
    job (one process, torchrun ranks or a Ray driver) holding the run's lock, waiting up to
    ``lock_wait_s`` for it."""
    if config.engine == "ray" and not config.merge:
        from engine.select.ray_engine import require_ray

        require_ray()  # one line now, not after the tokenizer is trained
    ranks = start_runtime(scorer_config(config).device)
    try:
        if ranks.distributed and (config.engine != "local" or config.merge):
            raise UserError("under torchrun, select runs with --engine local and without --merge "
                            "(run a merge as one process)")
        return _select(config, run_dir, ranks, progress or (lambda _: None), on_shard_scored, lock_wait_s)
    finally:
        stop_runtime(ranks)


def _check_run_state(config: SelectConfig, run_dir: RunDir, labels: list[str]) -> None:
    stored = run_dir.read_config().get(STAGE)
    if stored is None:
        return
    if not config.continues_run:
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


def _config_dict(config: SelectConfig) -> dict[str, Any]:
    data = asdict(config)
    data["inputs"] = list(config.inputs)
    return data


def selection_record(config: SelectConfig, labels: list[str]) -> dict[str, Any]:
    """What ``config.json`` keeps of a selection: its config, what its scores depend on, its inputs."""
    return {**_config_dict(config), "scoring_identity": config.scoring_identity(), "shards": labels}


def scorer_config(config: SelectConfig) -> SelectConfig:
    """The config the scorer of this process is built from. A merge scores nothing and the Ray engine
    scores in its actors, so their own scorer, only asked what it is (``describe``, ``max_tokens``),
    loads on the CPU: the login node or Ray head that runs them may have no GPU."""
    if config.device != "cpu" and (config.merge or config.engine == "ray"):
        return replace(config, device="cpu")
    return config


def _select(config: SelectConfig, run_dir: RunDir, ranks: Runtime, report: ProgressCallback,
            on_shard_scored, lock_wait_s: float = 0.0) -> dict[str, Any]:
    shards = discover_shards(list(config.inputs) or [sample_pool_glob()])
    labels = shard_labels(shards)

    # Set-up on rank 0 (lock, checks, scorer, tokenizer, config); other ranks wait and learn of any error.
    session = None
    if ranks.is_main:
        try:
            session = run_dir.open_stage(STAGE, wait_s=lock_wait_s)
            if config.force:  # only what an earlier selection of this run wrote
                run_dir.discard(STAGE_OUTPUTS[STAGE])
                run_dir.forget_stage(STAGE)
            _check_run_state(config, run_dir, labels)
            scorer = build_scorer(scorer_config(config), run_dir, shards)
            spec = scorer.tokenizer_path or config.tokenizer
            resolve_tokenizer(spec, run_dir.tokenizer_path, training_sample(shards, text_field=config.text_field),
                              config.vocab_size)
            run_dir.record_config(STAGE, selection_record(config, labels))
        except BaseException as failure:
            if session is not None:
                session.close(failure)
            if ranks.distributed and isinstance(failure, Exception):
                broadcast(ranks, failure_message(failure))  # release the other ranks before leaving
            raise
    error = broadcast(ranks, None)
    if error:
        raise UserError(error)
    if not ranks.is_main:
        scorer = build_scorer(scorer_config(config), run_dir, shards)
        session = run_dir.open_stage(STAGE, main=False)

    try:
        manifest = Selection(config, run_dir, ranks, shards, labels, scorer, session.events, report).run(
            on_shard_scored)
    except BaseException as failure:
        session.close(failure)
        raise
    session.close(None)
    return manifest


@dataclass
class ShardTotals:
    """What the budget needs of one scored shard: lines (for document ids), documents, tokens."""

    lines: int
    documents: int
    tokens: int


@dataclass
class Selection:
    """One rank's part of a selection, step by step: ``run`` scores, selects and writes."""

    config: SelectConfig
    run_dir: RunDir
    ranks: Runtime
    shards: list[Path]
    labels: list[str]
    scorer: Scorer
    events: EventLog
    report: ProgressCallback
    totals: dict[int, ShardTotals] = field(default_factory=dict)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_EDGES.size - 1, np.int64))
    outputs: dict[str, Any] | None = None
    """What ``write`` produced (the output format's files and facts), for the manifest."""
    share: Share | None = None
    """An independent shard job's share of the input (``engine.select.shards``); None: the rank's."""

    @property
    def mine(self) -> list[int]:
        owns = self.share.owns if self.share is not None else self.ranks.owns
        return [i for i in range(len(self.shards)) if owns(i)]

    def run(self, on_shard_scored) -> dict[str, Any]:
        config, ranks = self.config, self.ranks
        started = time.time()
        self.events.emit(
            "start", shards=len(self.shards), budget=config.budget, unit=config.unit, scorer=self.scorer.name,
            temperature=config.temperature, seed=config.seed, world_size=ranks.world_size, resume=config.resume,
            engine=config.engine, merge=config.merge, device=ranks.device,
        )
        # 1. Score every shard of this rank that has no valid score file yet. Only a few figures per shard
        # stay in memory; score arrays are read back one shard at a time, so memory follows the kept set.
        self.score(on_shard_scored)
        # 2. Totals over all ranks; then the global budget.
        budget = self.budget()
        # 3. Exact top-k: per rank over its own score files, merged on rank 0.
        self.report(SelectProgress("selecting"))
        cutoff = self.cutoff(budget)
        # 4. Write the kept documents of this rank's shards, then the manifest.
        summaries = self.write(budget, cutoff)
        manifest = None
        if ranks.is_main:
            manifest = self.finish(summaries, budget, cutoff, elapsed_s=time.time() - started)
        barrier(ranks)
        return broadcast(ranks, manifest)

    # ---- the steps

    def score(self, on_shard_scored) -> None:
        """Score this rank's (or share's) shards that have no valid score file yet, with the engine
        ``--engine`` names; a merge scores nothing and stops if any shard lacks its scores."""
        self.reuse_score_files()
        todo = [ShardJob(i, str(self.shards[i]), self.labels[i]) for i in self.mine if i not in self.totals]
        if todo and self.config.merge:
            from engine.select.shards import missing_scores_message

            raise UserError(missing_scores_message(self.run_dir, self.labels, [job.index for job in todo]))
        if self.config.engine == "ray" and todo:
            from engine.select.ray_engine import RayShardScoring

            RayShardScoring(self, todo, on_shard_scored).run()
        else:
            ShardScoring(self, todo, on_shard_scored).run()

    def reuse_score_files(self) -> None:
        identity = self.scorer.describe()  # once: for dsir it hashes the whole log-ratio table
        for index in self.mine:
            cached = load_shard_scores(score_file(self.run_dir, self.labels[index]))
            if cached is not None and cached.scorer == identity and cached.label == self.labels[index]:
                self.totals[index] = ShardTotals(cached.n_lines, cached.docs, cached.token_total)
                self.histogram += score_histogram(cached.scores)
        if self.totals and self.ranks.is_main:
            self.events.emit("resumed", shards_reused=len(self.totals))

    def budget(self) -> SelectionBudget:
        config = self.config
        everyone: dict[int, ShardTotals] = {}
        for part in all_gather(self.ranks, {i: self.totals[i] for i in self.mine}):
            everyone.update(part)
        n_lines = [everyone[i].lines for i in range(len(self.shards))]
        total_docs = sum(t.documents for t in everyone.values())
        total_tokens = sum(t.tokens for t in everyone.values())
        pool_total = total_tokens if config.unit == "tokens" else total_docs
        if total_docs == 0:
            raise UserError(f"no documents to select from in {len(self.shards)} input file(s): every line was "
                            "skipped or empty")
        if sum(n_lines) >= 2**32:
            raise UserError("more than 4.29 billion input lines in one selection: split the pool into several runs")
        amount = config.parsed_budget.resolve(pool_total)
        if amount <= 0:
            raise UserError(f"--budget {config.budget} of {pool_total:,} {config.unit} keeps no document (it rounds "
                            "down to 0). The scores are saved: run the same command with --resume and a larger --budget")
        shard_base = np.concatenate([[0], np.cumsum(n_lines, dtype=np.int64)])[:-1]
        return SelectionBudget(amount=amount, pool_total=pool_total, shard_base=shard_base)

    def keys_and_weights(self, shard: ShardScores, index: int, budget: SelectionBudget):
        config = self.config
        values = selection_values(shard.scores, shard.lines, shard.label, config.temperature, config.seed)
        keys = rank_keys(values, shard.lines.astype(np.uint64) + np.uint64(budget.shard_base[index]))
        weights = shard.tokens if config.unit == "tokens" else np.ones(shard.lines.size, np.uint32)
        return keys, weights

    def shard_scores(self, index: int) -> ShardScores:
        shard = load_shard_scores(score_file(self.run_dir, self.labels[index]))
        if shard is None:
            raise UserError(f"score file of {self.labels[index]} vanished from {self.run_dir.scores} during the run")
        return shard

    def cutoff(self, budget: SelectionBudget) -> int | None:
        """The rank key of the first document left out (None: everything fits)."""
        config = self.config
        topk = TopKByWeight(budget.amount)
        for index in self.mine:
            topk.push(*self.keys_and_weights(self.shard_scores(index), index, budget))
        states = all_gather(self.ranks, topk.state())
        cutoff, empty = None, None
        if self.ranks.is_main:
            merged = TopKByWeight(budget.amount)
            for state in states:
                merged.merge(state)
            cutoff = merged.cutoff
            if merged.kept()[0].size == 0:  # even the best-ranked document is over the budget
                best = int(merged.state()[1][0])
                empty = (f"--budget {config.budget} ({budget.amount:,} {config.unit}) keeps no document: the "
                         f"best-ranked one alone has {best:,} {config.unit}. The scores are saved: run the same "
                         "command with --resume and a larger --budget")
        cutoff, empty = broadcast(self.ranks, (cutoff, empty))
        if empty:
            raise UserError(empty)
        return cutoff

    def write(self, budget: SelectionBudget, cutoff: int | None) -> dict[int, ShardSummary]:
        """Copy this rank's kept lines into the subset; every rank's shard summaries, gathered."""
        mine = self.mine
        self.report(SelectProgress("writing", 0, len(mine)))
        chosen = output_format(self.config.output_format)
        if self.ranks.is_main:  # what another --output-format of an earlier selection of this run left
            self.run_dir.discard(p for name, patterns in OUTPUT_PATTERNS.items() if name != chosen.output
                                 for p in patterns)
        jobs, summaries = [], {}
        for index in mine:
            shard = self.shard_scores(index)
            keys, _ = self.keys_and_weights(shard, index, budget)
            kept = np.ones(keys.size, bool) if cutoff is None else keys < np.uint64(cutoff)
            summary = ShardSummary.of(shard, kept)
            output = shard_output(self.run_dir.selected, self.labels[index], chosen)
            # a joined format's documents end up in its one file, not in the part written on the way
            name = output.name if chosen.output != "megatron" else f"{MEGATRON_PREFIX}.bin"
            summary.output = name if kept.any() else None
            summaries[index] = summary
            if kept.any():
                jobs.append(WriteJob(str(self.shards[index]), str(output), np.sort(shard.lines[kept]),
                                     output_format=chosen.output, text_field=self.config.text_field,
                                     tokenizer_path=str(self.run_dir.tokenizer_path)))
            else:
                output.unlink(missing_ok=True)  # a stale file from an earlier selection of this run
        if self.ranks.is_main:
            (self.run_dir.selected / "manifest.json").unlink(missing_ok=True)
        written = write_selected_shards(jobs, self.config.workers)
        self.report(SelectProgress("writing", len(mine), len(mine)))
        everyone: dict[int, ShardSummary] = {}
        for part in all_gather(self.ranks, summaries):
            everyone.update(part)
        # Every rank's files, in shard order: a joined format (megatron) is joined here, on rank 0.
        with_output = [i for i in mine if summaries[i].output]  # the shards of ``jobs``, in the same order
        files = {i: (job.output, n) for i, job, n in zip(with_output, jobs, written, strict=True)}
        every_file: dict[int, tuple[str, int]] = {}
        for part in all_gather(self.ranks, files):
            every_file.update(part)
        if self.ranks.is_main:
            self.outputs = finish_outputs(chosen, self.run_dir.selected, [every_file[i] for i in sorted(every_file)],
                                          str(self.run_dir.tokenizer_path))
        return everyone

    def finish(self, summaries: dict[int, ShardSummary], budget: SelectionBudget, cutoff: int | None,
               *, elapsed_s: float) -> dict[str, Any]:
        config, run_dir = self.config, self.run_dir
        first_out = None
        if cutoff is not None:
            ordinal = int(cutoff) & 0xFFFFFFFF
            shard_index = int(np.searchsorted(budget.shard_base, ordinal, side="right")) - 1
            first_out = {"shard": self.labels[shard_index], "line": ordinal - int(budget.shard_base[shard_index])}
        builder = ManifestBuilder(SelectionFacts(
            run=run_dir.name, scorer=self.scorer.describe(), seed=config.seed, temperature=config.temperature, unit=config.unit, budget_spec=config.budget,
            budget_amount=budget.amount, pool_total=budget.pool_total, keeps_everything=cutoff is None,
            first_excluded=first_out,
            token_counting=("exact" if config.exact_token_counts
                            else f"exact up to {self.scorer.max_tokens} tokens, extrapolated beyond"),
            tokenizer=str(run_dir.tokenizer_path), world_size=self.ranks.world_size,
            output_format=config.output_format, output=self.outputs,
        ))
        for index in range(len(self.shards)):
            builder.add(summaries[index])
        manifest = builder.build(elapsed_s=elapsed_s)
        atomic_write_json(run_dir.selected / "manifest.json", manifest)
        atomic_write_json(run_dir.report / "select.json", manifest)
        atomic_write_bytes(run_dir.report / "select.md", render_markdown(manifest).encode())
        self.events.emit(
            "histogram", edges=HISTOGRAM_EDGES.tolist(), counts=manifest["histogram"]["seen"],
            counts_kept=manifest["histogram"]["kept"], threshold=manifest["score_threshold"],
        )
        self.events.emit(
            "done", docs_seen=manifest["documents"]["seen"], docs_kept=manifest["documents"]["kept"],
            tokens_seen=manifest["tokens"]["seen"], tokens_kept=manifest["tokens"]["kept"],
            threshold=manifest["score_threshold"], elapsed_s=manifest["elapsed_s"],
        )
        self.report(SelectProgress("done"))
        return manifest


@dataclass(frozen=True)
class SelectionBudget:
    amount: int
    """How many tokens or documents to keep."""
    pool_total: int
    shard_base: np.ndarray
    """int64 (shards,): the first document id of each shard (ids count lines across shards)."""


class ShardAccumulator:
    """One shard's scored batches as they arrive, until its ``ShardDone`` turns them into a score file."""

    def __init__(self) -> None:
        self.lines: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self.text_bytes = 0
        self.estimated = 0

    def add(self, message: DocBatch, scores: np.ndarray) -> None:
        self.lines.append(message.lines)
        self.scores.append(scores)
        self.tokens.append(message.n_tokens)
        self.codes.append(message.source_codes)
        self.text_bytes += message.text_bytes
        self.estimated += message.n_estimated

    def scores_of(self, job: ShardJob, done: ShardDone, scorer: dict[str, Any]) -> ShardScores:
        return ShardScores(
            label=job.label, path=job.path, n_lines=done.n_lines, lines=_concat(self.lines, np.uint32),
            scores=_concat(self.scores, np.float32), tokens=_concat(self.tokens, np.uint32),
            source_codes=_concat(self.codes, np.uint16), source_names=done.source_names, skips=done.skips,
            text_bytes=self.text_bytes, n_estimated=self.estimated, scorer=scorer,
        )


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.empty(0, dtype)


class ScoringRates:
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


class ShardScoring:
    """Scores the shards in ``todo``: reader workers stream batches, the scorer scores them here, each
    finished shard becomes its score file; progress and histogram events on the way."""

    def __init__(self, selection: Selection, todo: list[ShardJob], on_shard_scored):
        self.selection = selection
        self.todo = todo
        self.on_shard_scored = on_shard_scored
        self.rates = ScoringRates()
        self.total_stored = float(sum(stored_size(as_location(job.path)) for job in todo)) or 1.0
        self.shards_done = len(selection.totals)
        self.shards_total = len(todo) + len(selection.totals)

    def run(self) -> None:
        selection = self.selection
        scorer, config = selection.scorer, selection.config
        spec = TokenizeSpec(
            tokenizer_path=str(selection.run_dir.tokenizer_path), max_tokens=scorer.max_tokens,
            ship_tokens=scorer.needs_tokens, exact_counts=config.exact_token_counts,
            text_scorer=scorer.text_scorer, text_field=config.text_field,
        )
        if config.threads is not None and scorer.needs_tokens:  # a model scorer: torch is loaded already
            scorer.use_threads(config.threads)
        jobs = {job.index: job for job in self.todo}
        parts: dict[int, ShardAccumulator] = {}
        identity = scorer.describe()
        self.last_progress = self.last_histogram = time.perf_counter()
        pipeline = ShardPipeline(self.todo, spec, config.workers)
        try:
            for message in pipeline:
                if isinstance(message, DocBatch):
                    job = jobs[message.shard_index]
                    batch = ShardBatch(job.label, message.lines, message.n_tokens, message.token_lists(),
                                       message.text_scores)
                    scores = np.asarray(scorer.score(batch), np.float32)
                    parts.setdefault(message.shard_index, ShardAccumulator()).add(message, scores)
                    self.rates.docs += message.lines.size
                    self.rates.tokens += int(message.n_tokens.sum(dtype=np.uint64))
                    self.rates.text_bytes += message.text_bytes
                    self.rates.stored_bytes += message.stored_bytes
                    selection.histogram += score_histogram(scores)
                elif isinstance(message, ShardDone):
                    job = jobs[message.shard_index]
                    shard = parts.pop(message.shard_index, ShardAccumulator()).scores_of(job, message, identity)
                    save_shard_scores(score_file(selection.run_dir, job.label), shard)
                    selection.totals[message.shard_index] = ShardTotals(shard.n_lines, shard.docs, shard.token_total)
                    del shard
                    self.rates.stored_bytes += message.stored_bytes
                    self.rates.skipped += sum(message.skips.values())
                    self.shards_done += 1
                    if self.on_shard_scored is not None:
                        self.on_shard_scored(job.label)
                elif isinstance(message, ShardFailed):
                    raise UserError(message.message)
                self.emit_when_due()
        finally:
            pipeline.close()
        self.emit_progress()

    def emit_when_due(self) -> None:
        """The progress and histogram events, each at most every so many seconds."""
        now = time.perf_counter()
        if now - self.last_progress >= PROGRESS_EVERY_S:
            self.last_progress = now
            self.emit_progress()
        if now - self.last_histogram >= HISTOGRAM_EVERY_S:
            self.last_histogram = now
            self.selection.events.emit("histogram", edges=HISTOGRAM_EDGES.tolist(),
                                       counts=self.selection.histogram.tolist(), threshold=None)

    def emit_progress(self) -> None:
        figures = self.rates.figures()
        rates = self.rates
        self.selection.events.emit(
            "progress", fraction=round(rates.stored_bytes / self.total_stored, 4), docs_seen=rates.docs,
            tokens_seen=rates.tokens, bytes_read=rates.text_bytes, skipped=rates.skipped,
            shards_done=self.shards_done, shards_total=self.shards_total, **figures,
        )
        self.selection.report(SelectProgress(
            "scoring", rates.stored_bytes, self.total_stored, rates.docs, figures["docs_per_s"],
            figures["mb_per_s"], figures["tokens_per_s"], rates.skipped,
        ))
