"""``select --output-format megatron``: the subset tokenised, as one Megatron/GPT-NeoX indexed dataset.

Each shard's kept documents are tokenised whole with the run's tokenizer, an end-of-document token
after each (the writer processes do this in parallel, one part per shard under ``selected/parts/``);
``finish`` then joins the parts in shard order into ``selected/subset_text_document.bin`` and writes its
``.idx`` (``engine.data.megatron`` has the format). GPT-NeoX's ``data_path`` and Megatron-LM's
``--data-path`` take ``runs/NAME/selected/subset_text_document``; so does ``blissctl pretrain --data``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.formats import MEGATRON_PREFIX
from engine.data.megatron import token_dtype_for, write_index
from engine.run_dir import atomic_write_bytes, atomic_write_with, file_sha256
from engine.select.writer import WriteJob, check_written, kept_texts

ENCODE_BATCH = 512
_tokenizers: dict[str, Any] = {}


def _tokenizer(path: str):
    """One tokenizer per writer process, loaded on its first shard."""
    if path not in _tokenizers:
        from tokenizers import Tokenizer

        _tokenizers[path] = Tokenizer.from_file(path)
    return _tokenizers[path]


def sizes_path(part: Path) -> Path:
    return part.with_suffix(".sizes")


def write_shard(job: WriteJob) -> int:
    """Tokenise the kept documents of one shard into its part: tokens (``.bin``) and sizes (``.sizes``)."""
    from engine.data.tokenizer import encode_long, end_of_text_id

    if job.tokenizer_path is None:
        raise ValueError("--output-format megatron needs the run's tokenizer")
    tokenizer = _tokenizer(job.tokenizer_path)
    eod = end_of_text_id(tokenizer)
    dtype = token_dtype_for(tokenizer.get_vocab_size())
    sizes: list[int] = []

    def write(tmp: Path) -> None:
        batch: list[str] = []
        with open(tmp, "wb") as out:
            def flush() -> None:
                for ids in encode_long(tokenizer, batch):
                    out.write(np.asarray([*ids, eod], dtype).tobytes())
                    sizes.append(len(ids) + 1)
                batch.clear()

            for text in kept_texts(job):
                batch.append(text)
                if len(batch) >= ENCODE_BATCH:
                    flush()
            flush()

    part = Path(job.output)
    atomic_write_with(part, write)
    atomic_write_bytes(sizes_path(part), np.asarray(sizes, "<i4").tobytes())
    check_written(job, len(sizes))
    return len(sizes)


def finish(selected: Path, files: list[tuple[str, int]], tokenizer_path: str) -> dict[str, Any]:
    """Join the parts (``files``: each shard's part and documents, in shard order) into
    ``subset_text_document.{bin,idx}``; the parts go."""
    from tokenizers import Tokenizer

    from engine.data.tokenizer import end_of_text_id

    tokenizer = Tokenizer.from_file(tokenizer_path)
    dtype = token_dtype_for(tokenizer.get_vocab_size())
    parts = [Path(output) for output, _ in files]
    written = [n for _, n in files]
    data, index = selected / f"{MEGATRON_PREFIX}.bin", selected / f"{MEGATRON_PREFIX}.idx"
    index.unlink(missing_ok=True)  # never a new .bin beside an old .idx: a reader checks the pair

    def join(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)

    def sizes():
        for part in parts:
            yield np.fromfile(sizes_path(part), "<i4")

    atomic_write_with(data, join)
    n_documents = sum(written)
    atomic_write_with(index, lambda tmp: write_index(tmp, dtype, n_documents, sizes))
    n_tokens = data.stat().st_size // dtype.itemsize
    shutil.rmtree(selected / "parts", ignore_errors=True)
    return {
        "files": [data.name, index.name],
        "megatron": {
            "prefix": MEGATRON_PREFIX, "documents": n_documents, "tokens": n_tokens, "dtype": dtype.name,
            "eod_id": end_of_text_id(tokenizer), "vocab_size": tokenizer.get_vocab_size(),
            "tokenizer_sha256": file_sha256(Path(tokenizer_path)),
        },
    }
