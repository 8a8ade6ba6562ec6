"""``select --engine ray``: scoring on a Ray cluster with Ray Data, for elastic scale.

The flow, as one Ray Data dataset:

1. one row per input shard still to score;
2. ``flat_map(read_shard_rows)``: a CPU task per shard runs the local engine's own reader
   (``engine.data.workers.process_shard``: decompress, parse, skip and count bad lines, tokenise the
   prefix the scorer sees, DSIR's n-grams) and yields one row per batch of documents, then a last row
   with the shard's counts and how many batches came before it;
3. ``map_batches(ScoreBatches)``: a pool of ``--ray-actors`` actors, each holding one scorer built from
   the same config (and ``--ray-gpus-per-actor`` GPUs), scores each batch;
4. this process (the driver) gathers each shard's scored batches, in whatever order they arrive, and
   once a shard's last row and all its batches are in, writes its score file as the local engine would.

The selection then goes on as always (``engine.select.stage``): exact top-k from the score files, the
subset, the manifest. Score files do not say which engine wrote them, so resume, ``--merge`` and a
later local run treat them alike, and the result equals a single-process run's.

Faults: a read task whose worker dies (a node lost, the OOM killer) is run again by Ray
(``max_retries``); scorer actors are restarted and their batches retried (Ray Data's default for actor
pools). Errors in the data itself are not retried: a corrupt file becomes a row naming it, and the run
stops with that one line, as the local engine does.

Ray is imported only here, and only under ``--engine ray``: it is an optional extra (``scale``).
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.workers import DocBatch, ShardDone, ShardJob, TokenizeSpec, process_shard
from engine.errors import UserError
from engine.select.config import SelectConfig
from engine.select.manifest import score_histogram
from engine.select.score_files import save_shard_scores, score_file
from engine.select.scorers.base import ShardBatch
from engine.select.stage import (
    ScoringRates,
    ShardAccumulator,
    ShardScoring,
    ShardTotals,
)

READ_RETRIES = 3
"""How often Ray runs a read task again after its worker died (system failures only)."""
LIGHT_ACTOR_CPUS = 0.0
"""CPUs a scorer actor reserves when its scorer runs no model (random, dsir): their work is in the read
tasks and the actor's is a few numpy operations a batch, so any reservation would keep a read task
from starting (a quarter CPU on 2 cores left room for one read task, and halved the docs/s)."""
RAY_EXTRA = "pip install 'blissctl[scale]' (ray[data]==2.40.0)"


def require_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"--engine ray needs Ray Data, which is not installed: {RAY_EXTRA}") from None
    return ray


def connect(config: SelectConfig) -> bool:
    """Join the cluster ``--ray-address`` (or ``RAY_ADDRESS``) names, else start a local one; True when
    this call started Ray (and so should stop it). A Ray already initialised in this process is used."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **options)
        else:
            from engine.runtime import available_cores

            ray.init(num_cpus=available_cores(), **options)
    except ConnectionError as error:
        raise UserError(f"--ray-address {address}: cannot reach the Ray cluster ({error})") from None
    return True


def quiet_ray_data() -> None:
    """No progress bars or execution banners on the terminal: the stage's own events and progress
    display report the scoring."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False  # batches are gathered by (shard, seq) anyway
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)


_TOKENIZERS: dict[str, Any] = {}


def read_shard_rows(row: dict[str, Any], *, spec: TokenizeSpec):
    """A read task: one input shard as rows — ``batch`` rows (a pickled ``DocBatch``), then one ``done``
    (or ``failed``) row whose ``seq`` is the number of batches before it."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per task: tasks are the parallelism
    tokenizer = _TOKENIZERS.get(spec.tokenizer_path)
    if tokenizer is None:  # once per worker process, not per shard
        from tokenizers import Tokenizer

        tokenizer = _TOKENIZERS[spec.tokenizer_path] = Tokenizer.from_file(spec.tokenizer_path)
    job = ShardJob(int(row["index"]), str(row["path"]), str(row["label"]))
    seq = 0
    for message in process_shard(job, spec, tokenizer):
        kind = "batch" if isinstance(message, DocBatch) else "done" if isinstance(message, ShardDone) else "failed"
        # pickle: these rows only travel between this project's own processes, as the local engine's
        # multiprocessing queues do.
        yield {"shard": job.index, "seq": seq, "kind": kind, "payload": pickle.dumps(message, protocol=5)}
        seq += kind == "batch"


class ScoreBatches:
    """A scorer actor: builds the scorer once, then scores ``batch`` rows and passes the others on.

    Only the figures the score file needs travel back (token ids are dropped)."""

    def __init__(self, config: SelectConfig, run_root: str, shards: list[str], labels: list[str],
                 threads: int | None):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from engine.run_dir import RunDir
        from engine.select.stage import build_scorer

        self.labels = labels
        self.scorer = build_scorer(config, RunDir(Path(run_root)), [Path(s) for s in shards])
        if threads:  # a model scorer (the local engine's rule: ModelScorer.use_threads)
            self.scorer.use_threads(threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = []
        for kind, payload in zip(batch["kind"], batch["payload"], strict=True):
            if kind != "batch":
                payloads.append(payload)
                continue
            message: DocBatch = pickle.loads(payload)
            scores = self.scorer.score(ShardBatch(self.labels[message.shard_index], message.lines, message.n_tokens,
                                                  message.token_lists(), message.text_scores))
            message.token_ids = message.offsets = None
            payloads.append(pickle.dumps((message, np.asarray(scores, np.float32)), protocol=5))
        return {**batch, "payload": np.array(payloads, dtype=object)}


@dataclass
class ShardInFlight:
    """One shard's scored batches as they arrive, by their place in the shard; complete once its
    ``done`` row has said how many there are and all of them are in."""

    batches: dict[int, tuple[DocBatch, np.ndarray]]
    done: ShardDone | None = None
    expected: int | None = None

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.batches) == self.expected


class RayShardScoring(ShardScoring):
    """``ShardScoring`` with Ray Data doing the reading and scoring; this process writes the score files
    and the progress events, as the local engine does."""

    def run(self) -> None:
        ray = require_ray()
        selection = self.selection
        scorer, config = selection.scorer, selection.config
        started_here = connect(config)
        self.rates = ScoringRates()  # docs/s from here: starting a local cluster is not scoring
        try:
            quiet_ray_data()
            dataset = self.dataset(ray)
            jobs = {job.index: job for job in self.todo}
            flights: dict[int, ShardInFlight] = {}
            identity = scorer.describe()
            self.last_progress = self.last_histogram = time.perf_counter()
            for row in dataset.iter_rows():
                index, kind = int(row["shard"]), str(row["kind"])
                flight = flights.setdefault(index, ShardInFlight(batches={}))
                if kind == "failed":
                    raise UserError(pickle.loads(row["payload"]).message)
                if kind == "done":
                    flight.done, flight.expected = pickle.loads(row["payload"]), int(row["seq"])
                    self.rates.stored_bytes += flight.done.stored_bytes
                    self.rates.skipped += sum(flight.done.skips.values())
                else:
                    message, scores = pickle.loads(row["payload"])
                    flight.batches[int(row["seq"])] = (message, scores)
                    self.rates.docs += message.lines.size
                    self.rates.tokens += int(message.n_tokens.sum(dtype=np.uint64))
                    self.rates.text_bytes += message.text_bytes
                    self.rates.stored_bytes += message.stored_bytes
                    selection.histogram += score_histogram(scores)
                if flight.complete:
                    self.save(jobs[index], flights.pop(index), identity)
                self.emit_when_due()
            unfinished = [jobs[i].label for i in flights]
            if unfinished:  # Ray finished the dataset without some shard's last row: never keep half a shard
                raise RuntimeError(f"ray engine: shards {unfinished[:3]} came back incomplete")
        finally:
            if started_here:
                ray.shutdown()
        self.emit_progress()

    def dataset(self, ray):
        """The Ray Data pipeline: shards → read tasks → scorer actors."""
        selection = self.selection
        scorer, config = selection.scorer, selection.config
        spec = TokenizeSpec(
            tokenizer_path=str(selection.run_dir.tokenizer_path.resolve()), max_tokens=scorer.max_tokens,
            ship_tokens=scorer.needs_tokens, exact_counts=config.exact_token_counts, text_scorer=scorer.text_scorer,
            text_field=config.text_field,
        )
        gpus = config.ray_gpus_per_actor
        if gpus is None:
            gpus = 1.0 if config.device.startswith("cuda") else 0.0
        cpus = config.ray_cpus_per_actor
        if cpus is None:
            cpus = float(config.threads or 1) if scorer.needs_tokens else LIGHT_ACTOR_CPUS
        threads = (config.threads or max(1, int(cpus))) if scorer.needs_tokens else None
        rows = [{"index": job.index, "label": job.label,
                 # a remote input (fsspec URL) stays as it is; a local one is made absolute for the workers
                 "path": job.path if isinstance(job.path, str) and "://" in job.path else str(Path(job.path).resolve())}
                for job in self.todo]
        # One block per shard, so that every shard is its own read task (and its own retry).
        shards = ray.data.from_items(rows, override_num_blocks=len(rows))
        # max_retries on the read tasks also keeps Ray from fusing them into the scorer actors (fused
        # operators must have the same resources): reading stays on the CPUs, spread over the cluster.
        batches = shards.flat_map(read_shard_rows, fn_kwargs={"spec": spec}, num_cpus=1, max_retries=READ_RETRIES)
        return batches.map_batches(
            ScoreBatches, batch_size=1, batch_format="numpy", concurrency=config.ray_actors, num_gpus=gpus,
            num_cpus=cpus,
            fn_constructor_kwargs={
                "config": config, "run_root": str(selection.run_dir.root.resolve()),
                "shards": [str(p.resolve()) for p in selection.shards], "labels": selection.labels,
                "threads": threads,
            },
        )

    def save(self, job: ShardJob, flight: ShardInFlight, identity: dict[str, Any]) -> None:
        """The shard's score file, its batches in reading order (as the local engine writes it)."""
        selection = self.selection
        parts = ShardAccumulator()
        for seq in range(flight.expected or 0):
            parts.add(*flight.batches[seq])
        shard = parts.scores_of(job, flight.done, identity)
        save_shard_scores(score_file(selection.run_dir, job.label), shard)
        selection.totals[job.index] = ShardTotals(shard.n_lines, shard.docs, shard.token_total)
        self.shards_done += 1
        if self.on_shard_scored is not None:
            self.on_shard_scored(job.label)
