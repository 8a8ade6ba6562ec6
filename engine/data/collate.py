"""Padding token sequences into model batches: shared by train-scorer and the model-based scorers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def collate(token_lists: Sequence[np.ndarray], pad_id: int, device: torch.device | str,
            seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, both (B, T) with T the longest document (≤ ``seq_len``).

    An empty document becomes one padding token with mask 1, so that no row is entirely masked.
    """
    lengths = [max(1, min(len(t), seq_len) if seq_len else len(t)) for t in token_lists]
    T = max(lengths)
    ids = np.full((len(token_lists), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_lists), T), dtype=np.int64)
    for i, (tokens, n) in enumerate(zip(token_lists, lengths, strict=True)):
        ids[i, : min(len(tokens), n)] = tokens[:n]
        mask[i, :n] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
