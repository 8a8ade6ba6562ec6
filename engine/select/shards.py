"""Independent shard jobs, ``select --shard-index I --num-shards N``, and the merge that joins them.

What BLISS's own scripts, MATES, QuRating and FineWeb-Edu's classifier runs do on a cluster: N jobs (a
Slurm array) each score a disjoint share of the input shards, with no rendezvous between them — they
start, fail and restart on their own — and one merge computes the exact top-k from the score files.
The share rule is the torchrun ranks' (``engine.runtime.deals_to``: input shard i, in sorted input
order, belongs to share i mod N), so the same pool splits the same way whichever launcher is used.

How the jobs coordinate, through files of the run only (atomic writes, ``flock`` locks the kernel
releases when a job dies, so a killed job never leaves a stale lock):

- **Set-up once.** The first job trains the default tokenizer, fits DSIR and records ``config.json``
  under the run's lock; every later job finds that done and only reads it. The check is made again
  under the lock (double-checked), so a thousand jobs starting together do not queue on the lock.
- **One writer per share.** A job scores under ``scores/shares/share-I-of-N.lock``: a requeued copy of a
  share whose first copy still runs stops with one line instead of scoring the same shards twice.
  Scores land as one file per input shard (``score_files``): a restarted job scores only what is missing.
- **Done markers.** A finished share writes ``scores/shares/share-I-of-N.done.json`` (its shards,
  documents and tokens, and what scored them). A job that then finds all N markers, made by the same
  scorer over the same inputs, claims ``scores/shares/merge.lock`` without waiting — of two jobs finishing
  together one merges — and runs the merge: the ordinary stage with ``--merge``, under the run's lock,
  which reads every score file and writes the subset. ``select --merge`` does the same by hand.

Why the result equals a single-process run: score files do not depend on which job wrote them (each
document's score is a function of the scorer and the document), and the merge is the single-process
top-k over those files, exact and tie-broken by document id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from engine.data.sample import sample_pool_glob
from engine.data.sources import discover_shards, shard_labels
from engine.data.tokenizer import resolve_tokenizer, training_sample
from engine.errors import UserError
from engine.run_dir import RunDir, atomic_write_json
from engine.runtime import deals_to, launched_by_torchrun, start_runtime, stop_runtime
from engine.select.config import ProgressCallback, SelectConfig, SelectProgress
from engine.select.scorers.base import Scorer

SHARES_FOLDER = "shares"
MERGE_CLAIM = "merge.lock"
SET_UP_WAIT_S = 1800.0
"""How long a job waits for the run's lock (held by the first job's set-up — a tokenizer to train, DSIR
to fit — or by a merge) before it gives up with the holder's name."""


@dataclass(frozen=True)
class Share:
    """Share ``index`` of ``count``: the input shards one independent job scores."""

    index: int
    count: int

    def owns(self, shard_index: int) -> bool:
        return deals_to(shard_index, self.index, self.count)

    @property
    def name(self) -> str:
        return f"share-{self.index:05d}-of-{self.count:05d}"

    def lock_name(self) -> str:
        """The share's lock, relative to the run (``RunDir.open_stage(lock_name=...)``)."""
        return f"scores/{SHARES_FOLDER}/{self.name}.lock"


@dataclass(frozen=True)
class ShareResult:
    """What a shard job did: its done marker, the shares still running, and the manifest if it merged."""

    marker: dict[str, Any]
    pending: list[int]
    manifest: dict[str, Any] | None = None
    merged_elsewhere: bool = False
    """Every share was done but another job had claimed the merge."""


def shares_dir(run_dir: RunDir) -> Path:
    return run_dir.scores / SHARES_FOLDER


def done_marker(run_dir: RunDir, share: Share) -> Path:
    return shares_dir(run_dir) / f"{share.name}.done.json"


def inputs_digest(labels: list[str]) -> str:
    """Identifies the input list (its order decides every share): markers of another list do not count."""
    return hashlib.sha256("\n".join(labels).encode()).hexdigest()


def run_share(config: SelectConfig, run_dir: RunDir, *, progress: ProgressCallback | None = None,
              on_shard_scored: Callable[[str], None] | None = None) -> ShareResult:
    """One shard job: score this share into ``scores/``, mark it done, merge if it is the last."""
    from engine.select.stage import STAGE, Selection

    if launched_by_torchrun():
        raise UserError("--shard-index runs as one process per job; under torchrun the ranks share the "
                        "shards themselves: leave out --shard-index and --num-shards")
    report = progress or (lambda _: None)
    share = Share(config.shard_index, config.num_shards)
    shards = discover_shards(list(config.inputs) or [sample_pool_glob()])
    labels = shard_labels(shards)
    _check_layout(run_dir, share)
    scorer = _set_up(config, run_dir, shards, labels)
    identity = scorer.describe()
    ranks = start_runtime(config.device)
    session = None
    try:
        session = run_dir.open_stage(STAGE, lock_name=share.lock_name())
        selection = Selection(config, run_dir, ranks, shards, labels, scorer, session.events, report, share=share)
        session.events.emit("start", share=share.index, num_shards=share.count, shards=len(selection.mine),
                            scorer=scorer.name, seed=config.seed, host=socket.gethostname())
        selection.score(on_shard_scored)
        marker = {
            "share": share.index, "num_shards": share.count, "inputs_sha256": inputs_digest(labels),
            "scorer": identity, "shards": [labels[i] for i in selection.mine],
            "documents": sum(t.documents for t in selection.totals.values()),
            "tokens": sum(t.tokens for t in selection.totals.values()),
            "finished": round(time.time(), 3), "host": socket.gethostname(), "pid": os.getpid(),
        }
        atomic_write_json(done_marker(run_dir, share), marker)
        session.events.emit("share_done", share=share.index, num_shards=share.count, shards=len(marker["shards"]),
                            docs_seen=marker["documents"], tokens_seen=marker["tokens"])
    except BaseException as failure:
        if session is not None:
            session.close(failure)
        raise
    finally:
        stop_runtime(ranks)
    session.close(None)  # the share's lock goes before the merge: a rerun of this share need not wait
    report(SelectProgress("done"))

    pending = pending_shares(run_dir, share.count, identity, inputs_digest(labels))
    if pending or not config.merge_when_done:
        return ShareResult(marker=marker, pending=pending)
    with claim_merge(run_dir) as claimed:
        if not claimed:
            return ShareResult(marker=marker, pending=[], merged_elsewhere=True)
        from engine.select.stage import run_whole_selection

        merge = replace(config, shard_index=None, num_shards=None, merge=True)
        manifest = run_whole_selection(merge, run_dir, progress=progress, lock_wait_s=SET_UP_WAIT_S)
    return ShareResult(marker=marker, pending=[], manifest=manifest)


def _set_up(config: SelectConfig, run_dir: RunDir, shards: list[Path], labels: list[str]) -> Scorer:
    """The run's one-time set-up (tokenizer, a fitted scorer, ``config.json``), done by whichever job comes
    first; the scorer this job scores with."""
    from engine.select.stage import STAGE, _check_run_state, build_scorer, selection_record

    def done() -> bool:
        return run_dir.read_config().get(STAGE) is not None and run_dir.tokenizer_path.exists()

    if not done():
        with run_dir.lock(STAGE, wait_s=SET_UP_WAIT_S):
            if not done():  # still not: this job is the first
                _check_run_state(config, run_dir, labels)
                scorer = build_scorer(config, run_dir, shards)
                spec = scorer.tokenizer_path or config.tokenizer
                resolve_tokenizer(spec, run_dir.tokenizer_path, training_sample(shards, text_field=config.text_field),
                                  config.vocab_size)
                run_dir.record_config(STAGE, selection_record(config, labels))
                return scorer
    _check_run_state(config, run_dir, labels)  # the same scorer, seed, tokenizer and inputs as the others
    return build_scorer(config, run_dir, shards)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _markers(run_dir: RunDir) -> list[dict[str, Any]]:
    folder = shares_dir(run_dir)
    found = [_read_marker(path) for path in sorted(folder.glob("share-*.done.json"))] if folder.is_dir() else []
    return [marker for marker in found if marker is not None]


def _check_layout(run_dir: RunDir, share: Share) -> None:
    """Shares of another N would overlap this one's shards: one split per run."""
    for marker in _markers(run_dir):
        if marker.get("num_shards") != share.count:
            raise UserError(f"--num-shards {share.count}: this run's shares were made with --num-shards "
                            f"{marker.get('num_shards')}; use that, or another --run")


def pending_shares(run_dir: RunDir, count: int, identity: dict[str, Any], digest: str) -> list[int]:
    """The shares of ``count`` without a done marker made by this scorer over these inputs."""
    pending = []
    for index in range(count):
        marker = _read_marker(done_marker(run_dir, Share(index, count)))
        if marker is None or marker.get("scorer") != identity or marker.get("inputs_sha256") != digest:
            pending.append(index)
    return pending


@contextlib.contextmanager
def claim_merge(run_dir: RunDir):
    """Yields True to the one job that may merge now (a non-blocking ``flock``), False to the others."""
    path = shares_dir(run_dir) / MERGE_CLAIM
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            claimed = True
        except BlockingIOError:
            claimed = False
        except OSError as error:  # a file system without locks: the run's own lock still serialises merges
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            claimed = True
        yield claimed
    finally:
        os.close(fd)


def missing_scores_message(run_dir: RunDir, labels: list[str], missing: list[int]) -> str:
    """Why ``--merge`` cannot select yet: which input shards have no usable score file, and which shard
    jobs to run for them."""
    names = ", ".join(labels[i] for i in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    counts = {marker.get("num_shards") for marker in _markers(run_dir)}
    head = (f"--merge: {len(missing)} of {len(labels)} input shards have no score file made by this scorer "
            f"({names})")
    if len(counts) == 1 and isinstance(count := counts.pop(), int) and count > 0:
        shares = sorted({i % count for i in missing})
        listed = ", ".join(map(str, shares[:10])) + (" ..." if len(shares) > 10 else "")
        return (f"{head}; they belong to share(s) {listed} of --num-shards {count}: run those shard jobs "
                "(or, to score them here, the same command with --resume instead of --merge)")
    return (f"{head}: score them with shard jobs (--shard-index I --num-shards N), or here with the same "
            "command with --resume instead of --merge")
