"""The BLISS score model: the proxy's backbone, mean-pooled over the real tokens, then ``Linear(d, 1)``
and a sigmoid. Its output s_i in (0, 1) is sample i's influence score.

It starts as a copy of the warmed-up proxy's backbone (``ScoreModel.from_proxy``), so it begins with
features that already tell text apart. The artifact ``select`` loads (``save_score_model`` /
``load_score_model``) holds the weights plus what is needed to rebuild the network without the
training run: the preset name, the tokenizer's vocabulary size and the sequence length it was trained on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import UserError
from engine.models.presets import ModelConfig, hf_config, model_preset, with_max_seq_len

ARTIFACT_FORMAT = "blissctl.score-model/1"


class ScoreModel(nn.Module):
    """Backbone (GPTNeoXModel / LlamaModel) → masked mean-pool → Linear(d, 1) → sigmoid."""

    def __init__(self, backbone: nn.Module, d_model: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(d_model, 1)
        # Small init: the first scores sit near sigmoid(0) = 0.5, so the first batch weights are ~uniform.
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_proxy(cls, proxy: nn.Module) -> ScoreModel:
        """A score model whose backbone is a copy of ``proxy``'s (the LM head is dropped)."""
        backbone = copy.deepcopy(proxy.base_model)
        model = cls(backbone, proxy.config.hidden_size)
        return model.to(next(proxy.parameters()).device)

    @classmethod
    def build(cls, config: ModelConfig, vocab_size: int, *, attn_implementation: str = "sdpa") -> ScoreModel:
        """A randomly initialised score model of preset ``config`` (weights are loaded afterwards)."""
        from transformers import AutoModel

        hf = hf_config(config, vocab_size, attn_implementation)
        backbone = AutoModel.from_config(hf, attn_implementation=attn_implementation)
        return cls(backbone, config.d_model)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores, (B,). ``attention_mask`` is 1 on real tokens; every row needs at least one."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden.float()  # (B, T, C); pool in fp32 even under autocast
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, C)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)  # (B,)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores s_i in (0, 1), (B,)."""
        return torch.sigmoid(self.logits(input_ids, attention_mask))


def save_score_model(path: Path, model: ScoreModel, *, preset: str, vocab_size: int, seq_len: int,
                     pad_id: int, extra: dict[str, Any] | None = None) -> None:
    """Write the score model artifact atomically (what ``select --scorer bliss`` loads)."""
    from engine.run_dir import atomic_write_with

    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload = {
        "format": ARTIFACT_FORMAT,
        "preset": preset,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "pad_id": pad_id,
        "state_dict": state,
        **(extra or {}),
    }
    atomic_write_with(Path(path), lambda tmp: torch.save(payload, tmp))


def load_score_model(path: Path, *, device: str = "cpu") -> tuple[ScoreModel, dict[str, Any]]:
    """The score model stored at ``path`` (in eval mode, on ``device``) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"score model not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise UserError(f"cannot read score model {path}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise UserError(f"{path} is not a blissctl score model (expected format {ARTIFACT_FORMAT})")
    config = with_max_seq_len(model_preset(payload["preset"]), int(payload["seq_len"]))
    model = ScoreModel.build(config, int(payload["vocab_size"]))
    model.load_state_dict(payload.pop("state_dict"))
    model.eval().to(device)
    return model, payload
