"""Tokenise documents once, by worker processes, into one flat memory-mapped token file.

Layout of ``runs/<name>/data/``: ``train.bin`` / ``val.bin`` (raw token ids, ``uint16`` when the
vocabulary fits, else ``uint32``) and ``train.json`` / ``val.json`` (a small header: dtype, token and
document counts, UTF-8 bytes, the source fingerprint). Every document is followed by one end-of-text
token, so documents are packed back to back (GPT-NeoX style) and fixed-length training sequences are
read as windows ``tokens[i*T : i*T + T + 1]`` (inputs and shifted targets share the window).
The file does not depend on the sequence length, so ``--seq-len`` can change without re-tokenising.

Work is split by shard: each worker tokenises one shard into ``data/parts/<split>/NNNNN.bin`` (written
atomically, with its own header), so an interrupted preparation resumes with the shards already done;
the parts are then joined in shard order, and the header, written last, marks the split complete.
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from engine.data.locations import Location, as_location, fingerprint
from engine.data.sources import SkipCounts, discover_shards, read_documents
from engine.data.tokenizer import encode_long
from engine.errors import UserError
from engine.run_dir import atomic_write_json, atomic_write_with, file_sha256
from engine.runtime import die_with_parent

FORMAT_VERSION = 1
ENCODE_BATCH = 512
"""Documents handed to the tokenizer at a time: amortises the Python → Rust call."""


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (Pythia's 50k vocabulary does), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def source_fingerprint(path: Location) -> dict:
    """What must not change for a packed part to be reused: the file's identity, size and mtime (a URL's
    ETag or modification time)."""
    return fingerprint(path)


@dataclass(frozen=True, kw_only=True)
class PackedData:
    """One packed split, opened read-only as a memory map."""

    tokens: np.ndarray
    """All token ids, documents separated by end-of-text, shape (n_tokens,)."""
    header: dict
    """The split's JSON header (``n_tokens``, ``n_documents``, ``n_bytes``, ``dtype``, ...)."""

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def n_sequences(self, seq_len: int) -> int:
        """Full training windows of ``seq_len`` inputs (+1 target) in the split."""
        return max(0, (self.n_tokens - 1) // seq_len)

    def sequence(self, index: int, seq_len: int) -> np.ndarray:
        """Window ``index``: ``seq_len + 1`` tokens, inputs ``[:-1]``, targets ``[1:]``."""
        start = index * seq_len
        return self.tokens[start : start + seq_len + 1]


def open_packed(data_dir: Path, split: str) -> PackedData:
    """The packed ``split`` (``train`` or ``val``) in ``data_dir``; a one-line error if not prepared."""
    header_path = data_dir / f"{split}.json"
    if not header_path.exists():
        raise UserError(f"no packed {split} data in {data_dir} (run blissctl pretrain to prepare it)")
    header = orjson.loads(header_path.read_bytes())
    # A Megatron dataset is read where it is (``use_indexed``): its .bin is already a packed token file.
    bin_path = Path(header["bin"]) if header.get("bin") else data_dir / f"{split}.bin"
    if not bin_path.is_file():
        raise UserError(f"{bin_path}: the packed {split} tokens are gone (run blissctl pretrain to prepare them)")
    tokens = np.memmap(bin_path, dtype=np.dtype(header["dtype"]), mode="r")
    if tokens.shape[0] != header["n_tokens"]:
        raise UserError(f"{bin_path}: {tokens.shape[0]} tokens, header says {header['n_tokens']}")
    return PackedData(tokens=tokens, header=header)


def use_indexed(prefix: str, data_dir: Path, split: str, tokenizer_path: Path) -> PackedData:
    """Train on a Megatron/GPT-NeoX indexed dataset (``PREFIX.bin`` + ``.idx``) without copying it.

    Its ``.bin`` is what packing makes (documents back to back, each ended by its end-of-document token
    when it was written with one, as ``select --output-format megatron`` does), so the header written
    here points the trainer at it. The ids must fit the run's tokenizer; when the dataset comes from a
    ``select`` run, its manifest's tokenizer must be this one.
    """
    from tokenizers import Tokenizer

    from engine.data.megatron import open_indexed
    from engine.data.tokenizer import end_of_text_id

    dataset = open_indexed(prefix)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    vocab_size, eot_id = tokenizer.get_vocab_size(), end_of_text_id(tokenizer)
    key = {"format": FORMAT_VERSION, "indexed": [source_fingerprint(Path(prefix + ".idx")),
                                                 source_fingerprint(Path(prefix + ".bin"))],
           "tokenizer_sha256": file_sha256(tokenizer_path)}
    header_path = data_dir / f"{split}.json"
    if header_path.exists() and orjson.loads(header_path.read_bytes()).get("key") == key:
        return open_packed(data_dir, split)
    manifest_path = Path(prefix).parent / "manifest.json"
    if manifest_path.is_file():
        made_with = orjson.loads(manifest_path.read_bytes()).get("megatron") or {}
        if made_with.get("tokenizer_sha256") not in (None, key["tokenizer_sha256"]):
            raise UserError(f"{prefix}: tokenised with another tokenizer than this run's ({tokenizer_path}); pass "
                            "that select run's tokenizer.json with --tokenizer")
    n_tokens = int(dataset.tokens.shape[0])
    if n_tokens < 2:
        raise UserError(f"{prefix}: fewer than 2 tokens to train on")
    chunks = [dataset.tokens[i : i + (1 << 24)] for i in range(0, n_tokens, 1 << 24)]  # views, read in 16M pieces
    top = max(int(c.max()) for c in chunks)
    if top >= vocab_size or min(int(c.min()) for c in chunks) < 0:
        raise UserError(f"{prefix}: token id {top} does not fit the tokenizer's {vocab_size:,} ids; pass the "
                        "tokenizer the dataset was made with (--tokenizer)")
    header = {
        "key": key, "bin": str(Path(prefix + ".bin").resolve()), "dtype": dataset.dtype.name,
        "vocab_size": vocab_size, "eot_id": eot_id, "n_tokens": n_tokens,
        "n_documents": max(0, int(dataset.doc_idx.shape[0]) - 1), "n_bytes": None, "n_shards": 1,
        "skipped": SkipCounts().as_dict(),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(header_path, header)
    return open_packed(data_dir, split)


# --- worker side ------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_path: str, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # One Rust thread per worker process: the pool already uses every core.
    os.environ["RAYON_RS_NUM_CPUS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)


def _encode(texts: list[str], eot_id: int, dtype: np.dtype) -> np.ndarray:
    pieces = []
    for ids in encode_long(_worker_tokenizer, texts):
        pieces.append(np.asarray(ids, dtype=dtype))
        pieces.append(np.asarray([eot_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _pack_shard(job: tuple[str, str, int, str, dict]) -> dict:
    """Tokenise one shard into its part file; returns the part's header."""
    shard, part_path, eot_id, dtype_name, fingerprint = job
    dtype = np.dtype(dtype_name)
    skips = SkipCounts()
    n_docs = n_bytes = n_tokens = 0
    batch: list[str] = []

    def write_part(tmp: Path) -> None:
        nonlocal n_docs, n_bytes, n_tokens
        with open(tmp, "wb") as out:

            def flush() -> None:
                nonlocal n_tokens
                ids = _encode(batch, eot_id, dtype)
                out.write(ids.tobytes())
                n_tokens += int(ids.shape[0])
                batch.clear()

            for doc in read_documents([as_location(shard)], skips):
                batch.append(doc.text)
                n_docs += 1
                n_bytes += len(doc.text.encode("utf-8"))
                if len(batch) >= ENCODE_BATCH:
                    flush()
            if batch:
                flush()

    atomic_write_with(Path(part_path), write_part)
    header = {
        "source": fingerprint,
        "n_tokens": n_tokens,
        "n_documents": n_docs,
        "n_bytes": n_bytes,
        "skipped": skips.as_dict(),
    }
    atomic_write_json(Path(part_path).with_suffix(".json"), header)
    return header


# --- launcher side ----------------------------------------------------------------------------


def _part_is_done(part: Path, fingerprint: dict, itemsize: int) -> dict | None:
    header_path = part.with_suffix(".json")
    if not (part.exists() and header_path.exists()):
        return None
    header = orjson.loads(header_path.read_bytes())
    if header.get("source") != fingerprint:
        return None
    if part.stat().st_size != header["n_tokens"] * itemsize:
        return None
    return header


def pack_split(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    data_dir: Path,
    split: str,
    tokenizer_path: Path,
    *,
    workers: int | None = None,
    leading_eot: bool = False,
    on_shard_done=None,
) -> PackedData:
    """Tokenise ``sources`` (files, folders or globs) into ``data_dir/<split>.bin``; reuse it if current.

    ``leading_eot`` puts one end-of-text before the first document so that every document token is
    predicted from a document boundary (used for the validation set, where bits per byte count every
    byte). ``on_shard_done(done, total)`` is called as shards finish.
    """
    from tokenizers import Tokenizer

    from engine.data.tokenizer import end_of_text_id

    shards = discover_shards(sources)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eot_id = end_of_text_id(tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    fingerprints = [source_fingerprint(s) for s in shards]
    key = {
        "format": FORMAT_VERSION,
        "sources": fingerprints,
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "leading_eot": leading_eot,
    }
    header_path = data_dir / f"{split}.json"
    if header_path.exists():
        existing = orjson.loads(header_path.read_bytes())
        if existing.get("key") == key and (data_dir / f"{split}.bin").exists():
            return open_packed(data_dir, split)

    # Parts are named by the tokenizer and source so a changed input never reuses a stale part.
    parts_dir = data_dir / "parts" / split / key["tokenizer_sha256"][:12]
    parts = [parts_dir / f"{i:05d}.bin" for i in range(len(shards))]
    headers: list[dict | None] = [
        _part_is_done(p, f, dtype.itemsize) for p, f in zip(parts, fingerprints, strict=True)
    ]
    todo = [i for i, h in enumerate(headers) if h is None]
    done = len(shards) - len(todo)
    if on_shard_done:
        on_shard_done(done, len(shards))
    if todo:
        jobs = [(str(shards[i]), str(parts[i]), eot_id, dtype.name, fingerprints[i]) for i in todo]
        n_workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        # spawn, not fork: the parent may hold torch or tokenizer thread pools that do not survive fork.
        context = multiprocessing.get_context("spawn")
        with context.Pool(n_workers, initializer=_init_worker, initargs=(str(tokenizer_path), os.getpid())) as pool:
            for i, header in zip(todo, pool.imap(_pack_shard, jobs), strict=True):
                headers[i] = header
                done += 1
                if on_shard_done:
                    on_shard_done(done, len(shards))

    n_tokens = sum(h["n_tokens"] for h in headers) + int(leading_eot)
    if n_tokens < 2:
        raise UserError(f"no text to train on in {sources} (every line was empty or skipped)")

    def join_parts(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            if leading_eot:
                out.write(np.asarray([eot_id], dtype=dtype).tobytes())
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)

    atomic_write_with(data_dir / f"{split}.bin", join_parts)
    skipped = SkipCounts()
    for h in headers:
        skipped.add(SkipCounts.from_dict(h["skipped"]))
    header = {
        "key": key,
        "dtype": dtype.name,
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": eot_id,
        "n_tokens": n_tokens,
        "n_documents": sum(h["n_documents"] for h in headers),
        "n_bytes": sum(h["n_bytes"] for h in headers),
        "n_shards": len(shards),
        "skipped": skipped.as_dict(),
    }
    atomic_write_json(header_path, header)  # written last: marks the split complete
    shutil.rmtree(data_dir / "parts" / split, ignore_errors=True)
    with contextlib.suppress(OSError):
        (data_dir / "parts").rmdir()  # only when no other split is half-done
    return open_packed(data_dir, split)


def tokenize_text_stream(texts: Sequence[str], tokenizer, *, leading_eot: bool = True) -> tuple[np.ndarray, int]:
    """Token ids of ``texts`` packed like ``pack_split`` does, and their UTF-8 byte count (in-process)."""
    from engine.data.tokenizer import end_of_text_id

    eot_id = end_of_text_id(tokenizer)
    ids: list[int] = [eot_id] if leading_eot else []
    n_bytes = 0
    for start in range(0, len(texts), ENCODE_BATCH):
        chunk = list(texts[start : start + ENCODE_BATCH])
        for doc_ids in encode_long(tokenizer, chunk):
            ids.extend(doc_ids)
            ids.append(eot_id)
        n_bytes += sum(len(t.encode("utf-8")) for t in chunk)
    return np.asarray(ids, dtype=np.int64), n_bytes
