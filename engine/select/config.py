"""``SelectConfig``: everything ``blissctl select`` needs, and what its progress display is told."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.data.formats import output_format as output_format_entry
from engine.data.tokenizer import DEFAULT_VOCAB_SIZE
from engine.errors import UserError
from engine.run_dir import check_config_integers
from engine.select.budget import Budget, parse_budget
from engine.select.scorers import scorer_entry

UNITS = ("tokens", "docs")
ENGINES = ("local", "ray")


@dataclass(frozen=True, kw_only=True)
class SelectConfig:
    """Everything ``blissctl select`` needs; the CLI builds it from flags."""

    inputs: tuple[str, ...] = ()
    """Files, folders, globs or URLs of ``*.json.gz`` / ``*.jsonl.zst`` / ``*.jsonl`` / ``*.parquet`` / a
    ``datasets`` ``save_to_disk`` folder; empty: the embedded sample."""
    budget: str = "30%"
    """Share of the pool (``30%``) or an absolute amount (``2M``) in ``unit``."""
    unit: str = "tokens"
    """``tokens`` or ``docs``: what the budget counts."""
    scorer: str = "random"
    """A scorer of the registry (``engine.select.scorers``): ``random``, ``bliss``, ``perplexity``, ``dsir``."""
    scorer_run: str | None = None
    """For ``bliss`` and ``perplexity``: a train-scorer run name under ``runs_dir``, or a checkpoint path."""
    val: str | None = None
    """For ``dsir``: the target documents (files, folders or globs), as ``train-scorer --val`` takes them."""
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
    threads: int | None = None
    """Threads of a model scorer in the main process (the CLI's default: the cores other work leaves
    idle, ``engine.runtime.thread_plan``): on a CPU, sub-batches scored side by side with one torch
    thread each (``ModelScorer.use_threads``); None leaves torch's setting alone."""
    tokenizer: str | None = None
    """A tokenizer.json or hub id; default: train a byte-level BPE on the input, saved in the run."""
    vocab_size: int = DEFAULT_VOCAB_SIZE
    """Vocabulary of the default trained tokenizer."""
    exact_token_counts: bool = False
    """Tokenise whole documents for exact counts instead of extrapolating past the scored prefix."""
    # --- where the data is read from and written to (issue 13: inputs and outputs)
    text_field: str = "text"
    """The field (JSONL) or column (parquet, Arrow) holding each document's text (``--text-field``)."""
    output_format: str = "jsonl.zst"
    """What ``selected/`` holds (``--output-format``): ``jsonl.zst`` (the kept lines byte for byte),
    ``parquet`` (every input column) or ``megatron`` (the subset tokenised, ``.bin`` + ``.idx``)."""
    resume: bool = False
    """Continue an interrupted run: shards already scored are not scored again."""
    force: bool = False
    """Discard this run's earlier selection (only the files ``select`` wrote) and start again."""
    runs_dir: str = "runs"

    # ---- at scale: independent shard jobs and their merge, and the Ray engine (README "At scale")
    shard_index: int | None = None
    """With ``num_shards``: score only this job's share of the input shards (those whose index in the
    sorted input list is ``shard_index`` modulo ``num_shards``, the torchrun ranks' rule) into ``scores/``,
    so that N independent jobs (a Slurm array) split a pool without talking to each other."""
    num_shards: int | None = None
    """How many independent shard jobs split the input (``--shard-index`` 0 to N-1)."""
    merge: bool = False
    """Score nothing: the exact top-k over every input shard's score file, then the subset. Refused
    while any shard has no score file."""
    merge_when_done: bool = True
    """A shard job that finds every share done merges at once, so the last job to finish writes the subset."""
    engine: str = "local"
    """``local`` (reader processes and the scorer in this process, or torchrun ranks) or ``ray`` (Ray
    Data: read/tokenise tasks on the cluster's CPUs, scorer actors on its GPUs or CPUs)."""
    ray_address: str | None = None
    """``--engine ray``: the cluster to join (``auto``, ``HOST:6379``, ``ray://HOST:10001``); default:
    ``RAY_ADDRESS`` if set, else a local cluster on this machine's cores."""
    ray_actors: int = 1
    """``--engine ray``: scorer actors (copies of the scorer) working in parallel."""
    ray_gpus_per_actor: float | None = None
    """``--engine ray``: GPUs each scorer actor holds; default 1 with ``--device cuda``, else 0."""
    ray_cpus_per_actor: float | None = None
    """``--engine ray``: CPUs each scorer actor holds; default ``threads`` (or 1) for a model scorer, and
    none for random and dsir, whose work happens in the read tasks."""

    def __post_init__(self) -> None:
        check_config_integers(self)
        if self.resume and self.force:
            raise UserError("--resume and --force contradict each other: choose one")
        if self.unit not in UNITS:
            raise UserError(f"--unit {self.unit!r}: choose tokens or docs")
        entry = scorer_entry(self.scorer)  # a one-line error naming the registered scorers
        if entry.needs_run and not self.scorer_run:
            raise UserError(f"--scorer {self.scorer} needs --scorer-run NAME (a train-scorer run) or a checkpoint path")
        if entry.needs_val and not self.val:
            raise UserError(f"--scorer {self.scorer} needs --val FILE: the target documents to select towards")
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
        if not self.text_field or self.text_field != self.text_field.strip():
            raise UserError(f"--text-field {self.text_field!r}: name the field or column that holds the text")
        output_format_entry(self.output_format)  # a one-line error naming the choices
        parse_budget(self.budget)  # fail on the flag, before any work
        self._check_scale_flags()

    def _check_scale_flags(self) -> None:
        if (self.shard_index is None) != (self.num_shards is None) and not (self.merge and self.shard_index is None):
            raise UserError("--shard-index and --num-shards go together: --shard-index I --num-shards N, I from 0 to N-1")
        if self.num_shards is not None and self.num_shards < 1:
            raise UserError(f"--num-shards {self.num_shards}: must be at least 1")
        if self.shard_index is not None and not 0 <= self.shard_index < self.num_shards:
            raise UserError(f"--shard-index {self.shard_index}: must be from 0 to {self.num_shards - 1} "
                            f"(--num-shards {self.num_shards})")
        if self.merge and self.shard_index is not None:
            raise UserError("--merge selects from every share's scores: leave out --shard-index")
        if self.force and (self.merge or self.shard_index is not None):
            raise UserError("--force would discard the scores other shard jobs wrote: remove the run folder, "
                            "or choose another --run, to start again")
        if self.engine not in ENGINES:
            raise UserError(f"--engine {self.engine!r}: choose local or ray")
        if self.engine == "ray" and self.shard_index is not None:
            raise UserError("--engine ray schedules the shards itself: leave out --shard-index and --num-shards")
        if self.ray_actors < 1:
            raise UserError(f"--ray-actors {self.ray_actors}: must be at least 1")
        if self.ray_gpus_per_actor is not None and not (self.ray_gpus_per_actor >= 0 and math.isfinite(self.ray_gpus_per_actor)):
            raise UserError(f"--ray-gpus-per-actor {self.ray_gpus_per_actor}: must be 0 or more")
        if self.ray_cpus_per_actor is not None and not (self.ray_cpus_per_actor >= 0 and math.isfinite(self.ray_cpus_per_actor)):
            raise UserError(f"--ray-cpus-per-actor {self.ray_cpus_per_actor}: must be 0 or more")

    @property
    def continues_run(self) -> bool:
        """Whether this command carries on a run that already has a selection without ``--resume``:
        shard jobs join one another's run, and a merge reads what they scored."""
        return self.resume or self.merge or self.shard_index is not None

    @property
    def parsed_budget(self) -> Budget:
        return parse_budget(self.budget)

    def scoring_identity(self) -> dict[str, Any]:
        """What the score files depend on: a resume must not mix scores made differently."""
        return {
            "scorer": self.scorer,
            "scorer_run": self.scorer_run,
            "val": self.val if scorer_entry(self.scorer).needs_val else None,
            "seed": self.seed if self.scorer == "random" else None,
            "seq_len": self.seq_len,
            "chunks": self.chunks,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size if self.tokenizer is None else None,
            "exact_token_counts": self.exact_token_counts,
            "text_field": None if self.text_field == "text" else self.text_field,  # runs made before it: None
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
