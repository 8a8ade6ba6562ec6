"""Writing the chosen subset: zstd JSONL shards holding the kept lines byte for byte.

Kept documents are copied as the exact bytes of their input line, so every field survives unchanged,
in their original order within the shard. Each output file appears atomically (temporary name, then
rename): a reader never sees half a shard, and an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from engine.data.sources import iter_raw_lines
from engine.run_dir import atomic_write_with
from engine.runtime import die_with_parent

ZSTD_LEVEL = 3


@dataclass(frozen=True)
class WriteJob:
    source: str
    output: str
    kept_lines: np.ndarray  # sorted uint32 line numbers to copy


def write_selected_shard(job: WriteJob) -> int:
    """Copy the kept lines of ``job.source`` into ``job.output``; returns how many were written."""
    wanted = job.kept_lines
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw) as out:
            if wanted.size == 0:
                return
            next_index, next_line = 0, int(wanted[0])
            for line, text in enumerate(iter_raw_lines(Path(job.source))):
                if line != next_line:
                    continue
                out.write(text + b"\n")
                written += 1
                next_index += 1
                if next_index == wanted.size:
                    break
                next_line = int(wanted[next_index])

    atomic_write_with(Path(job.output), write)
    if written != wanted.size:
        raise RuntimeError(f"{job.source}: expected {wanted.size} kept lines, found {written}; did the file change?")
    return written


def _init_writer(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what Ctrl-C does


def write_selected_shards(jobs: list[WriteJob], workers: int) -> list[int]:
    """Write every job, in ``workers`` processes (0: here); results in job order."""
    if workers <= 0 or not jobs:
        return [write_selected_shard(job) for job in jobs]
    context = mp.get_context("spawn")
    with context.Pool(min(workers, len(jobs)), initializer=_init_writer, initargs=(os.getpid(),)) as pool:
        return pool.map(write_selected_shard, jobs, chunksize=1)
