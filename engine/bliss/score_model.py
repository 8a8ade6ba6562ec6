"""The BLISS score model: the proxy's backbone, mean-pooled over the real tokens, then ``Linear(d, 1)``
and a sigmoid. Its output s_i in (0, 1) is sample i's influence score.

It starts as a copy of the warmed-up proxy's backbone (``ScoreModel.from_proxy``), so it begins with
features that already tell text apart. The file ``select`` loads is written and read by
``engine.bliss.artifacts``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from engine.models.families import hf_config
from engine.models.presets import ModelConfig


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
