"""Worker processes that turn input shards into batches the scorer can eat.

Decompression, JSON parsing and tokenisation all happen here, in ``--workers`` processes, so the
process that runs the model never waits on them. Only the text the scorer will see is tokenised (the
first ``max_tokens`` tokens' worth): on a CPU the tokenizer, not I/O, is the bottleneck. A document's
whole token count, needed for token budgets, is exact when the document fits in that prefix and
extrapolated from the prefix's own characters-per-token ratio otherwise (``--exact-token-counts``
tokenises everything instead).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from engine.data.locations import as_location
from engine.data.sources import ReadTally, SkipCounts, iter_text_records
from engine.data.tokenizer import encode_long
from engine.errors import UserError
from engine.runtime import die_with_parent, parent_is_alive

CHARS_PER_TOKEN_CAP = 6
"""Characters of prefix tokenised per wanted token. Web text averages ~4.3 characters a token with a
byte-level BPE, so 6 leaves room; a document whose prefix still comes up short is tokenised whole."""
MAX_SOURCES_PER_SHARD = 65535
OTHER_SOURCE = "(other)"
WORKER_CHECK_S = 1.0
"""How often the main process looks for reader workers that died."""


@dataclass(frozen=True, kw_only=True)
class TokenizeSpec:
    """What the workers do to each document."""

    tokenizer_path: str
    max_tokens: int
    """Tokens of each document the scorer looks at."""
    ship_tokens: bool
    """Send the token ids to the main process (only scorers that run a model need them)."""
    exact_counts: bool = False
    """Tokenise whole documents so that token counts are exact (slower)."""
    text_scorer: Callable[[list[str]], np.ndarray] | None = None
    """A scorer's part that reads the text itself (DSIR's n-grams): run here, in every worker, on each
    batch of texts; its float32 scores travel with the batch."""
    batch_docs: int = 256
    text_field: str = "text"
    """The field (JSONL) or column (parquet, Arrow) holding each document's text (``--text-field``)."""


@dataclass(frozen=True)
class ShardJob:
    index: int
    path: str
    label: str


@dataclass
class DocBatch:
    shard_index: int
    lines: np.ndarray  # uint32 (B,)
    n_tokens: np.ndarray  # uint32 (B,)
    n_estimated: int  # how many of the counts are extrapolated
    source_codes: np.ndarray  # uint16 (B,), index into the shard's source names
    text_bytes: int
    stored_bytes: int  # compressed bytes consumed since the previous message of this shard
    token_ids: np.ndarray | None = None  # int32, all documents' ids back to back
    offsets: np.ndarray | None = None  # int64 (B + 1,): document i is token_ids[offsets[i]:offsets[i+1]]
    text_scores: np.ndarray | None = None  # float32 (B,), from the spec's text_scorer

    def token_lists(self) -> list[np.ndarray] | None:
        if self.token_ids is None or self.offsets is None:
            return None
        return [self.token_ids[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]


@dataclass
class ShardDone:
    shard_index: int
    n_lines: int
    skips: dict[str, int]
    stored_bytes: int
    source_names: list[str] = field(default_factory=list)


@dataclass
class ShardFailed:
    shard_index: int
    message: str


class _Exit:
    """A worker ran out of jobs."""


def count_and_truncate(tokenizer, texts: list[str], spec: TokenizeSpec) -> tuple[list[list[int]], np.ndarray, int]:
    """Token ids (at most ``max_tokens`` each) and whole-document token counts for ``texts``."""
    max_tokens = spec.max_tokens
    if spec.exact_counts:
        ids = encode_long(tokenizer, texts)
        return [i[:max_tokens] for i in ids], np.fromiter((len(i) for i in ids), np.uint32, len(ids)), 0
    cap = max_tokens * CHARS_PER_TOKEN_CAP + 64
    prefixes = [t if len(t) <= cap else t[:cap] for t in texts]
    encodings = tokenizer.encode_batch_fast(prefixes, add_special_tokens=False)
    ids: list[list[int]] = []
    counts = np.empty(len(texts), np.uint32)
    n_estimated = 0
    for i, (text, encoding) in enumerate(zip(texts, encodings, strict=True)):
        doc_ids = encoding.ids
        if len(text) <= cap:
            counts[i] = len(doc_ids)
        elif len(doc_ids) > max_tokens:
            # Extrapolate from this document's own characters per token; the cut at ``cap`` may split a
            # word, so the ids past max_tokens (which include that last partial token) are dropped.
            counts[i] = int(round(len(doc_ids) * len(text) / cap))
            n_estimated += 1
        else:  # unusually long tokens: the prefix did not reach max_tokens, so look further
            doc_ids, counts[i], estimated = _longer_prefix(tokenizer, text, cap, max_tokens)
            n_estimated += estimated
        ids.append(doc_ids[:max_tokens])
    return ids, counts, n_estimated


def _longer_prefix(tokenizer, text: str, cap: int, max_tokens: int) -> tuple[list[int], int, int]:
    """(ids, token count, 1 if extrapolated) for a document whose first ``cap`` characters hold fewer than
    ``max_tokens`` tokens: prefixes four times longer each time until one does (then extrapolate from it),
    or the whole text fits; a 50 MB document is never tokenised whole just to count it."""
    window = cap
    while True:
        window *= 4
        if window >= len(text):
            doc_ids = encode_long(tokenizer, [text])[0]
            return doc_ids, len(doc_ids), 0
        doc_ids = encode_long(tokenizer, [text[:window]])[0]  # bounded memory even for a huge window
        if len(doc_ids) > max_tokens:
            return doc_ids, int(round(len(doc_ids) * len(text) / window)), 1


def process_shard(job: ShardJob, spec: TokenizeSpec, tokenizer) -> Iterator[DocBatch | ShardDone | ShardFailed]:
    """Read, parse and tokenise one shard; yields batches, then ``ShardDone`` (or ``ShardFailed``)."""
    skips = SkipCounts()
    tally = ReadTally()
    reported_stored = reported_bytes = 0
    sources: dict[str, int] = {"": 0}
    lines: list[int] = []
    texts: list[str] = []
    codes: list[int] = []

    def flush() -> DocBatch:
        nonlocal reported_stored, reported_bytes
        ids, counts, n_estimated = count_and_truncate(tokenizer, texts, spec)
        batch = DocBatch(
            shard_index=job.index,
            lines=np.asarray(lines, np.uint32),
            n_tokens=counts,
            n_estimated=n_estimated,
            source_codes=np.asarray(codes, np.uint16),
            text_bytes=tally.line_bytes - reported_bytes,
            stored_bytes=tally.position.stored_bytes - reported_stored,
        )
        if spec.text_scorer is not None:
            batch.text_scores = np.asarray(spec.text_scorer(texts), np.float32)
        if spec.ship_tokens:
            offsets = np.zeros(len(ids) + 1, np.int64)
            np.cumsum([len(i) for i in ids], out=offsets[1:])
            flat = np.fromiter((t for doc in ids for t in doc), np.int32, int(offsets[-1]))
            batch.token_ids, batch.offsets = flat, offsets
        reported_stored, reported_bytes = tally.position.stored_bytes, tally.line_bytes
        lines.clear(), texts.clear(), codes.clear()
        return batch

    try:
        for line, text, source in iter_text_records(as_location(job.path), skips, tally, spec.text_field):
            code = sources.get(source)
            if code is None:
                code = len(sources) if len(sources) < MAX_SOURCES_PER_SHARD else sources.setdefault(OTHER_SOURCE, len(sources))
                sources.setdefault(source, code)
            lines.append(line)
            texts.append(text)
            codes.append(code)
            if len(texts) >= spec.batch_docs:
                yield flush()
        if texts:
            yield flush()
    except UserError as error:  # CorruptInputError included: named file and line reached
        yield ShardFailed(job.index, str(error))
        return
    yield ShardDone(
        shard_index=job.index,
        n_lines=tally.lines,
        skips=skips.as_dict(),
        stored_bytes=tally.position.stored_bytes - reported_stored,
        source_names=list(sources),
    )


def _worker_main(jobs: mp.Queue, results: mp.Queue, spec: TokenizeSpec, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a kill -9 of select must not leave readers behind
    # Ctrl-C reaches the whole process group; the main process decides what happens, not the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(spec.tokenizer_path)
    while parent_is_alive(parent_pid):  # the portable check, where the kernel cannot be asked
        job = jobs.get()
        if job is None:
            results.put(_Exit())
            return
        for message in process_shard(job, spec, tokenizer):
            results.put(message)


def _worker_death(process: mp.Process) -> str:
    code = process.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
    hint = " (out of memory?)" if code == -signal.SIGKILL else ""
    return (f"reader worker (pid {process.pid}) {how}{hint} before its shards were read; the shards scored "
            "before it are kept: run the same command with --resume")


class ShardPipeline:
    """Iterate over the messages of all ``jobs``, produced by ``workers`` processes (0: in this process)."""

    def __init__(self, jobs: list[ShardJob], spec: TokenizeSpec, workers: int):
        self.jobs = jobs
        self.spec = spec
        self.workers = min(workers, len(jobs))
        self._processes: list[mp.Process] = []

    def __iter__(self) -> Iterator[DocBatch | ShardDone | ShardFailed]:
        if self.workers <= 0:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(self.spec.tokenizer_path)
            for job in self.jobs:
                yield from process_shard(job, self.spec, tokenizer)
            return
        yield from self._run_workers()

    def _run_workers(self) -> Iterator[DocBatch | ShardDone | ShardFailed]:
        context = mp.get_context("spawn")  # no fork: the main process may hold torch threads and a model
        jobs: mp.Queue = context.Queue()
        results: mp.Queue = context.Queue(maxsize=8 * self.workers)  # back-pressure bounds memory
        for job in self.jobs:
            jobs.put(job)
        for _ in range(self.workers):
            jobs.put(None)
        self._processes = [
            context.Process(target=_worker_main, args=(jobs, results, self.spec, os.getpid()), daemon=True)
            for _ in range(self.workers)
        ]
        for process in self._processes:
            process.start()
        running = self.workers
        checked = time.monotonic()
        try:
            while running:
                try:
                    message = results.get(timeout=WORKER_CHECK_S)
                except queue.Empty:
                    message = None
                if time.monotonic() - checked >= WORKER_CHECK_S or message is None:
                    # A worker that dies (OOM killer, kill -9) takes its shard with it: stop at once
                    # rather than after the others have finished.
                    checked = time.monotonic()
                    dead = [p for p in self._processes if p.exitcode not in (None, 0)]
                    if dead:
                        raise UserError(_worker_death(dead[0]))
                if message is None:
                    continue
                if isinstance(message, _Exit):
                    running -= 1
                    continue
                yield message
        finally:
            self.close()

    def close(self) -> None:
        started = [p for p in self._processes if p.pid is not None]
        for process in started:
            if process.is_alive():
                process.terminate()
        for process in started:
            process.join(timeout=5)
        self._processes = []
