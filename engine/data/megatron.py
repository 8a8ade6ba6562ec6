"""The Megatron/GPT-NeoX indexed dataset (``MMapIndexedDataset``): what those trainers read.

A dataset is a prefix with two files. ``PREFIX.bin`` holds every document's token ids back to back (a
little-endian integer dtype, no header). ``PREFIX.idx`` is the index:

    magic     9 bytes  b"MMIDIDX\\x00\\x00"
    version   uint64   1
    dtype     uint8    a code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16 (6, 7: floats)
    len       uint64   number of sequences
    doc_count uint64   entries of doc_idx (documents + 1)
    sizes     int32[len]        tokens of each sequence
    pointers  int64[len]        byte offset of each sequence in the .bin
    doc_idx   int64[doc_count]  the first sequence of each document, then len

blissctl writes one sequence per document, end-of-document token included (as Megatron's
preprocessing does with ``--append-eod``), in ``uint16`` when the vocabulary has fewer than 65,500
tokens and ``int32`` otherwise (Megatron's own rule). The index is written by streaming the sizes, so
memory does not grow with the number of documents.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import UserError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
"""The integer dtypes of the format (codes 6 and 7 are floats: no token ids)."""
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
CHUNK = 1 << 20
"""Sizes handled at a time while writing the index."""


def token_dtype_for(vocab_size: int) -> np.dtype:
    """Megatron's ``best_fitting_dtype``: ``uint16`` below 65,500 tokens, else ``int32``."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def dtype_code(dtype: np.dtype) -> int:
    return next(code for code, value in DTYPE_CODES.items() if np.dtype(value) == np.dtype(dtype))


def write_index(path: Path, dtype: np.dtype, n_sequences: int, sizes: Callable[[], Iterator[np.ndarray]]) -> None:
    """Write ``PREFIX.idx`` for ``n_sequences`` one-sequence documents; ``sizes()`` yields their token
    counts in chunks (called twice: once for the sizes, once for the pointers)."""
    itemsize = np.dtype(dtype).itemsize
    with open(path, "wb") as out:
        out.write(INDEX_MAGIC)
        out.write(struct.pack("<Q", INDEX_VERSION))
        out.write(struct.pack("<B", dtype_code(dtype)))
        out.write(struct.pack("<Q", n_sequences))
        out.write(struct.pack("<Q", n_sequences + 1))
        for chunk in sizes():
            out.write(np.asarray(chunk, "<i4").tobytes())
        offset = 0
        for chunk in sizes():
            ends = np.cumsum(np.asarray(chunk, np.int64) * itemsize) + offset
            out.write((ends - np.asarray(chunk, np.int64) * itemsize).astype("<i8").tobytes())
            offset = int(ends[-1]) if ends.size else offset
        for start in range(0, n_sequences + 1, CHUNK):
            out.write(np.arange(start, min(start + CHUNK, n_sequences + 1), dtype="<i8").tobytes())


@dataclass(frozen=True)
class IndexedDataset:
    """One indexed dataset, opened read-only (memory maps: nothing is read until used)."""

    prefix: str
    dtype: np.dtype
    sizes: np.ndarray
    """int32 (sequences,)"""
    pointers: np.ndarray
    """int64 (sequences,): byte offsets into the .bin"""
    doc_idx: np.ndarray
    """int64 (documents + 1,)"""
    tokens: np.ndarray
    """Every token of the .bin, shape (n_tokens,)."""

    def document(self, index: int) -> np.ndarray:
        """The tokens of sequence ``index``."""
        start = int(self.pointers[index]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[index])]


def open_indexed(prefix: str | os.PathLike) -> IndexedDataset:
    """``PREFIX.idx`` + ``PREFIX.bin``; anything that is not a consistent pair is one line."""
    prefix = str(prefix)
    index_path, data_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (index_path, data_path):
        if not path.is_file():
            raise UserError(f"{path}: not found (a Megatron dataset is PREFIX.bin with PREFIX.idx)")
    with open(index_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != INDEX_MAGIC:
        raise UserError(f"{index_path}: not a Megatron indexed dataset (no MMIDIDX header)")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    n, doc_count = struct.unpack("<QQ", head[18:34])
    if version != INDEX_VERSION or code not in DTYPE_CODES:
        raise UserError(f"{index_path}: unsupported index (version {version}, dtype code {code}; expected version 1 "
                        "with an integer dtype)")
    expected = HEADER_BYTES + 12 * n + 8 * doc_count
    if index_path.stat().st_size != expected:
        raise UserError(f"{index_path}: {index_path.stat().st_size:,} bytes, its header says {expected:,} (cut short?)")
    dtype = np.dtype(DTYPE_CODES[code])
    sizes = np.memmap(index_path, np.dtype("<i4"), "r", offset=HEADER_BYTES, shape=(n,)) if n else np.zeros(0, np.int32)
    pointers = (np.memmap(index_path, np.dtype("<i8"), "r", offset=HEADER_BYTES + 4 * n, shape=(n,))
                if n else np.zeros(0, np.int64))
    doc_idx = np.memmap(index_path, np.dtype("<i8"), "r", offset=HEADER_BYTES + 12 * n, shape=(doc_count,))
    data_bytes = data_path.stat().st_size
    end = int(pointers[-1]) + int(sizes[-1]) * dtype.itemsize if n else 0
    if end > data_bytes or data_bytes % dtype.itemsize:
        raise UserError(f"{data_path}: {data_bytes:,} bytes, its index needs {end:,} (the .bin and .idx do not match)")
    tokens = np.memmap(data_path, dtype, "r") if data_bytes else np.zeros(0, dtype)
    return IndexedDataset(prefix=prefix, dtype=dtype, sizes=sizes, pointers=pointers, doc_idx=doc_idx, tokens=tokens)


def indexed_prefix(spec: str | os.PathLike) -> str | None:
    """The dataset prefix ``spec`` names, or None when it names no indexed dataset: ``PREFIX``,
    ``PREFIX.bin`` or ``PREFIX.idx``, or a folder (a ``select`` output) holding exactly one pair."""
    text = os.fspath(spec)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix) and Path(text[: -len(suffix)] + ".idx").is_file():
            return text[: -len(suffix)]
    if Path(text + ".idx").is_file() and Path(text + ".bin").is_file():
        return text
    folder = Path(text)
    if folder.is_dir():
        pairs = sorted(str(p)[:-4] for p in folder.glob("*.idx") if p.with_suffix(".bin").is_file())
        if len(pairs) > 1:
            raise UserError(f"{text} holds {len(pairs)} Megatron datasets ({', '.join(Path(p).name for p in pairs)}): "
                            "name one prefix")
        if pairs:
            return pairs[0]
    return None
