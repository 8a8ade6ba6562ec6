"""The perplexity-filter baseline: keep the documents the warmed-up proxy finds least surprising.

A common heuristic of the data-selection literature (e.g. CCNet-style filtering, "perplexed by
perplexity"), and the obvious question to ask of BLISS: does the bilevel score model learn anything
beyond "the proxy already predicts this text well"? The scorer loads the proxy that ``train-scorer``
saved after its warm-up on random data (``checkpoints/proxy-warmup.pt``), with the run's tokenizer, and
scores each document by exp(−mean next-token NLL) of its first ``seq_len`` tokens: 1/perplexity, in
(0, 1], so that ``select``'s top-k under the budget keeps the lowest-perplexity documents and its score
histogram stays readable. It satisfies ``engine.select.scorers.base.Scorer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.collate import collate
from engine.errors import UserError
from engine.run_dir import file_sha256
from engine.select.scorers.base import ShardBatch

WARMUP_FILE = "proxy-warmup.pt"


def find_warmup_checkpoint(source: str | Path, runs_dir: Path | str = "runs") -> Path:
    """The warmed-up proxy of a train-scorer run: a checkpoint file, a run folder, or a run name."""
    path = Path(source)
    if path.is_file():
        return path
    for run in ([path] if path.is_dir() else []) + [Path(runs_dir) / str(source)]:
        candidate = run / "checkpoints" / WARMUP_FILE
        if candidate.is_file():
            return candidate
    raise UserError(f"{source}: no warmed-up proxy ({WARMUP_FILE}) found; run blissctl train-scorer first")


class PerplexityScorer:
    """Scores documents by 1/perplexity under a warmed-up proxy LM (higher = more predictable)."""

    name = "perplexity"
    needs_tokens = True

    def __init__(self, model: torch.nn.Module, *, checkpoint: Path, tokenizer_path: Path, seq_len: int,
                 pad_id: int, batch_size: int = 64, device: str = "cpu"):
        self.model = model.eval()
        self.checkpoint = checkpoint
        self.tokenizer_path = tokenizer_path
        self.seq_len = seq_len
        self.max_tokens = seq_len
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._sha256: str | None = None

    @classmethod
    def load(cls, source: str | Path, runs_dir: Path | str = "runs", *, seq_len: int | None = None,
             batch_size: int = 64, device: str = "cpu") -> PerplexityScorer:
        from engine.data.tokenizer import PADDING, end_of_text_id, load_tokenizer
        from engine.models.presets import build_causal_lm, model_preset, with_max_seq_len

        checkpoint = find_warmup_checkpoint(source, runs_dir)
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        tokenizer_path = checkpoint.parent.parent / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise UserError(f"no tokenizer.json in {checkpoint.parent.parent}: the proxy needs the tokenizer it "
                            "was trained with")
        seq_len = seq_len or int(state["seq_len"])
        model = build_causal_lm(with_max_seq_len(model_preset(state["preset"]), seq_len), int(state["vocab_size"]))
        model.load_state_dict(state["model"])
        tokenizer = load_tokenizer(tokenizer_path)
        pad_id = tokenizer.token_to_id(PADDING)
        pad_id = end_of_text_id(tokenizer) if pad_id is None else pad_id
        return cls(model.to(device), checkpoint=checkpoint.resolve(), tokenizer_path=tokenizer_path.resolve(),
                   seq_len=seq_len, pad_id=pad_id, batch_size=batch_size, device=device)

    @torch.inference_mode()
    def mean_nll(self, pieces: list[np.ndarray]) -> np.ndarray:
        """float64 (N,): mean next-token NLL of each token sequence; NaN for one with fewer than 2 tokens."""
        from engine.bliss.bilevel import lm_logits, sequence_losses

        out = np.full(len(pieces), np.nan)
        order = np.argsort([len(p) for p in pieces], kind="stable")  # similar lengths share a batch
        order = [i for i in order if len(pieces[i]) >= 2]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids_t, mask_t = collate([pieces[i] for i in idx], self.pad_id, self.device)
            losses = sequence_losses(lm_logits(self.model, ids_t, mask_t), ids_t, mask_t)
            out[idx] = losses.double().cpu().numpy()
        return out

    def score(self, batch: ShardBatch) -> np.ndarray:
        """float32 (B,): exp(−mean NLL) of each document's first ``seq_len`` tokens; 0 when it has < 2 tokens."""
        if batch.token_ids is None:
            raise ValueError("the perplexity scorer needs token ids (needs_tokens=True)")
        pieces = [np.asarray(t, dtype=np.int64)[: self.seq_len] for t in batch.token_ids]
        nll = self.mean_nll(pieces)
        return np.where(np.isnan(nll), 0.0, np.exp(-np.nan_to_num(nll, nan=0.0))).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.checkpoint)
        return {"name": self.name, "checkpoint": str(self.checkpoint), "checkpoint_sha256": self._sha256,
                "seq_len": self.seq_len}
