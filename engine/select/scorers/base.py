"""The interface every ``select`` scorer satisfies, and what the model-based ones share.

A scorer sees batches of documents from one shard and returns one float per document, in [0, 1] so that
the score histograms read the same for every scorer; higher means keep. The reader workers tokenise
only what a scorer will look at (``max_tokens``) and ship token ids only when ``needs_tokens`` is set;
a scorer that works on the text itself gives the workers a ``text_scorer`` (a picklable callable), so
that part runs in the worker processes, in parallel, and its results arrive as ``batch.text_scores``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engine.errors import UserError
from engine.run_dir import RunDir, file_sha256

if TYPE_CHECKING:
    from engine.select.config import SelectConfig

DEFAULT_SEQ_LEN = 512
"""Tokens of each document looked at by scorers that do not read tokens (they only bound the exact
token counting of the prefix)."""


@dataclass(frozen=True, slots=True)
class ShardBatch:
    """Documents of one shard, as the worker processes hand them to the scorer."""

    shard_label: str
    lines: np.ndarray
    """uint32 (B,): line numbers, the documents' ids within the shard."""
    n_tokens: np.ndarray
    """uint32 (B,): whole-document token counts (exact, or extrapolated past the tokenised prefix)."""
    token_ids: list[np.ndarray] | None = None
    """B int32 arrays of at most ``max_tokens`` ids each, when the scorer asked for them."""
    text_scores: np.ndarray | None = None
    """float32 (B,): what the scorer's ``text_scorer`` gave each document's text, in the workers."""


class Scorer(Protocol):
    name: str
    needs_tokens: bool
    max_tokens: int
    text_scorer: Callable[[list[str]], np.ndarray] | None
    tokenizer_path: Path | None
    """The tokenizer the workers must use (a model's own), or None for the run's."""

    def score(self, batch: ShardBatch) -> np.ndarray:
        """float32 (B,): one score per document, higher is better."""
        ...

    def describe(self) -> dict[str, Any]:
        """What identifies this scorer's output (recorded in the manifest, checked on resume)."""
        ...


@dataclass(frozen=True)
class ScorerContext:
    """What a scorer's ``build`` may look at: the settings, the run (for files it keeps, like a fitted
    model) and the input shards (for fitting on a sample of the pool)."""

    config: SelectConfig
    run_dir: RunDir
    shards: Sequence[Path]


class ModelScorer:
    """What the model-based scorers (bliss, perplexity) share: the model file and its tokenizer, the
    device and bf16 autocast on CUDA, the batch size and padding, and describing themselves by the
    model file's hash (so a resume never mixes scores of two models)."""

    name = "model"
    needs_tokens = True
    text_scorer = None

    def __init__(self, model, *, checkpoint: Path, tokenizer_path: Path, device: str, seq_len: int,
                 batch_size: int, pad_id: int):
        import torch

        self.model = model.eval()
        self.checkpoint = checkpoint
        self.tokenizer_path = tokenizer_path
        self.device = torch.device(device)
        self.seq_len = seq_len
        self.max_tokens = seq_len
        self.batch_size = batch_size
        self.pad_id = pad_id
        self._sha256: str | None = None
        self.parallel_batches = 1
        """Sub-batches scored at once on a CPU, each on its own thread of ``_pool`` (``use_threads``)."""
        self._pool = None

    @staticmethod
    def check_options(*, device: str, seq_len: int | None, batch_size: int) -> None:
        import torch

        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
        if seq_len is not None and seq_len < 1:
            raise UserError(f"--seq-len must be at least 1 (got {seq_len})")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")

    @staticmethod
    def padding_id(tokenizer_path: Path) -> int:
        from engine.data.tokenizer import load_tokenizer, padding_id

        return padding_id(load_tokenizer(tokenizer_path))

    def autocast(self):
        from engine.runtime import autocast

        return autocast(self.device)

    def use_threads(self, threads: int) -> None:
        """Spend ``threads`` cores on scoring. On a CPU, as that many sub-batches at once, each with one
        torch thread: a small model's operators are too short for torch's threads to pay off, and a
        thread of its own per sub-batch waits for no descheduled sibling when a reader process takes
        a core (bench/README_bliss.md, section 4). A sub-batch's scores do not depend on which thread
        ran it, or when. On a GPU: torch's threads."""
        import torch

        if self._pool is not None:
            self._pool.shutdown()
        side_by_side = self.device.type == "cpu" and threads > 1
        torch.set_num_threads(1 if side_by_side else threads)
        self.parallel_batches = threads if side_by_side else 1
        self._pool = None
        if side_by_side:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="scorer")

    def map_sub_batches(self, score_group: Callable[[np.ndarray], np.ndarray], groups: Sequence[np.ndarray]
                        ) -> list[np.ndarray]:
        """``score_group(g)`` for each group, in order: on the threads of ``use_threads`` (torch releases
        the GIL inside its operators). ``score_group`` enters inference mode itself: it is per thread."""
        if self._pool is None or len(groups) <= 1:
            return [score_group(group) for group in groups]
        return list(self._pool.map(score_group, groups))

    def identity(self) -> dict[str, Any]:
        """What else, beyond the model file, the scores depend on."""
        return {"seq_len": self.seq_len}

    def describe(self) -> dict[str, Any]:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.checkpoint)
        return {"name": self.name, "checkpoint": str(self.checkpoint), "checkpoint_sha256": self._sha256,
                **self.identity()}
