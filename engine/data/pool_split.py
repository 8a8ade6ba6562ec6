"""A deterministic split of a pool into disjoint parts, one per BLISS round (``blissctl rounds``).

Each round of BLISS trains its score model on, and selects from, a part of the pool no other round
sees. Two ways, chosen by the shape of the pool:

- ``shard``: whole input shards, dealt round-robin over the sorted shard list (part k gets shards k,
  k + parts, ...). Nothing is copied; the right way for a real pool of many shards.
- ``hash``: when there are too few shards to deal evenly, every document goes to part
  ``blake2b(seed, shard label, line) mod parts``, and each part is written once, its lines byte for
  byte, as zstd JSONL under the experiment (``pool/part-K/``). A document's part depends only on its
  id (shard label and line), never on the order of reading.

The split is recorded as JSON (``pool-split.json``), so every stage and every rerun reads the same
parts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import zstandard

from engine.data.formats import output_name
from engine.data.sources import discover_shards, iter_raw_lines, shard_labels
from engine.errors import UserError
from engine.run_dir import atomic_write_json

SPLIT_FILE = "pool-split.json"
SPLITS = ("auto", "shard", "hash")
MIN_PART_DOCUMENTS = 32
"""A part with fewer documents than this cannot train a score model or make a selection worth the name."""


@dataclass(frozen=True)
class PoolSplit:
    mode: str
    """``shard`` or ``hash``."""
    parts: tuple[tuple[str, ...], ...]
    """The files of each part (absolute paths), part 0 first."""
    documents: tuple[int, ...] | None = None
    """Documents per part (``hash`` mode counts them while writing; ``shard`` mode does not read the pool)."""
    seed: int = 0
    sources: tuple[str, ...] = ()
    """The pool as given."""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PoolSplit:
        return cls(mode=data["mode"], parts=tuple(tuple(p) for p in data["parts"]),
                   documents=tuple(data["documents"]) if data.get("documents") is not None else None,
                   seed=int(data.get("seed", 0)), sources=tuple(data.get("sources", ())))


def choose_mode(n_shards: int, parts: int, requested: str = "auto") -> str:
    """``auto``: by shard when the shards deal evenly (a multiple of the parts) or are plenty (four or
    more a part, so parts differ by at most a quarter); by hash otherwise."""
    if requested not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {requested!r}")
    if requested == "shard" and n_shards < parts:
        raise UserError(f"--split shard: {n_shards} shard(s) cannot make {parts} parts; use --split hash")
    if requested != "auto":
        return requested
    return "shard" if n_shards >= parts and (n_shards % parts == 0 or n_shards >= 4 * parts) else "hash"


def deal_shards(shards: list, parts: int) -> tuple[tuple[str, ...], ...]:
    """``shard`` mode's parts: the sorted shards dealt round-robin (part k gets shards k, k + parts, ...)."""
    return tuple(tuple(str(p) for p in shards[k::parts]) for k in range(parts))


def document_part(label: str, line: int, parts: int, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{label}\0{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % parts


def split_pool(sources: tuple[str, ...], parts: int, folder: Path, *, seed: int = 0, mode: str = "auto",
               progress=None) -> PoolSplit:
    """Split the pool ``sources`` (files, folders, globs) into ``parts`` parts, writing ``hash`` parts under
    ``folder / "pool"`` and the record to ``folder / SPLIT_FILE``; a recorded split is read back as it is."""
    record = folder / SPLIT_FILE
    if record.exists():
        return PoolSplit.from_dict(orjson.loads(record.read_bytes()))
    if parts < 2:
        raise UserError(f"a split needs at least 2 parts, got {parts}")
    shards = discover_shards(list(sources))
    chosen = choose_mode(len(shards), parts, mode)
    if chosen == "shard":
        split = PoolSplit(mode="shard", parts=deal_shards(shards, parts), seed=seed, sources=tuple(sources))
    else:
        split = _hash_split(shards, parts, folder / "pool", seed=seed, sources=tuple(sources), progress=progress)
        small = [k for k, n in enumerate(split.documents) if n < MIN_PART_DOCUMENTS]
        if small:
            raise UserError(f"the pool is too small for {parts} parts: part {small[0]} gets "
                            f"{split.documents[small[0]]} documents (at least {MIN_PART_DOCUMENTS} each); "
                            "use fewer --rounds or a larger --pool")
    atomic_write_json(record, split.as_dict())
    return split


def _hash_split(shards: list[Path], parts: int, out: Path, *, seed: int, sources: tuple[str, ...],
                progress) -> PoolSplit:
    """Stream each shard once into its parts' files (temporary names, renamed when the shard is done, so
    a killed split leaves no half file under a final name; the record is written last)."""
    counts = [0] * parts
    files: list[list[str]] = [[] for _ in range(parts)]
    for label, shard in zip(shard_labels(shards), shards, strict=True):
        targets = [out / f"part-{k}" / output_name(label) for k in range(parts)]
        temps = [t.with_name(f".{t.name}.tmp") for t in targets]
        handles, writers, written = [], [], [0] * parts
        try:
            for tmp in temps:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                handles.append(open(tmp, "wb"))
                writers.append(zstandard.ZstdCompressor(level=3).stream_writer(handles[-1], closefd=False))
            for line, raw in enumerate(iter_raw_lines(shard)):
                if raw and not raw.isspace():  # blank lines are not documents; bad ones travel on, to be counted
                    k = document_part(label, line, parts, seed)
                    writers[k].write(raw + b"\n")
                    written[k] += 1
            for writer, handle in zip(writers, handles, strict=True):
                writer.close()
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            for handle in handles:
                handle.close()
        for k in range(parts):
            if written[k]:
                os.replace(temps[k], targets[k])
                files[k].append(str(targets[k].resolve()))
                counts[k] += written[k]
            else:
                temps[k].unlink(missing_ok=True)
        if progress is not None:
            progress(label)
    return PoolSplit(mode="hash", parts=tuple(tuple(f) for f in files), documents=tuple(counts), seed=seed,
                     sources=sources)
