"""Model presets of the Pythia (GPT-NeoX) family, plus LLaMA-0.5B, each with its training defaults.

Shared by the BLISS proxy/score models (``train-scorer``) and by ``pretrain``. Layer/width/head counts
and learning rates follow the Pythia suite (Biderman et al., 2023); rotary fraction 0.25, parallel
residual, untied embeddings. Pythia trained every size with 1024 sequences × 2048 tokens (~2M tokens) a
step; the micro-batches are per-GPU sizes that fit an 80–141 GB accelerator in bf16 at 2048 tokens, and
the sizes from 1b up shard with FSDP (with DDP every GPU would hold the whole model and AdamW state).
How a preset becomes a network is ``engine.models.families``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.errors import UserError


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and reference optimisation settings of one model preset."""

    name: str
    """Preset name as given to ``--size`` / ``--proxy``."""
    family: str = "pythia"
    """``pythia`` (GPTNeoXForCausalLM) or ``llama`` (LlamaForCausalLM)."""
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int = 0
    """MLP width; 0 means 4 × d_model (Pythia)."""
    max_seq_len: int = 2048
    """Positions the model supports (Pythia: 2048)."""
    lr: float = 1e-3
    """Peak learning rate of the Pythia suite for this size."""
    rotary_pct: float = 0.25
    batch_sequences: int = 1024
    """Default global batch in sequences (Pythia: 1024 of 2048 tokens)."""
    micro_batch: int = 32
    """Default sequences per GPU per forward pass."""
    fsdp: bool = False
    """Shard with FSDP by default."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise UserError(f"model {self.name}: width {self.d_model} is not divisible by {self.n_heads} heads")

    @property
    def mlp_width(self) -> int:
        return self.d_ff or 4 * self.d_model


def pythia_tiny() -> ModelConfig:
    """For tests and the demo: 2 layers, width 64."""
    return ModelConfig(name="tiny", n_layers=2, d_model=64, n_heads=4, max_seq_len=2048, lr=1e-3, batch_sequences=32)


def pythia_14m() -> ModelConfig:
    return ModelConfig(name="14m", n_layers=6, d_model=128, n_heads=4, lr=1e-3)


def pythia_31m() -> ModelConfig:
    return ModelConfig(name="31m", n_layers=6, d_model=256, n_heads=8, lr=1e-3)


def pythia_70m() -> ModelConfig:
    return ModelConfig(name="70m", n_layers=6, d_model=512, n_heads=8, lr=1e-3)


def pythia_160m() -> ModelConfig:
    return ModelConfig(name="160m", n_layers=12, d_model=768, n_heads=12, lr=6e-4)


def pythia_410m() -> ModelConfig:
    return ModelConfig(name="410m", n_layers=24, d_model=1024, n_heads=16, lr=3e-4, micro_batch=16)


def pythia_1b() -> ModelConfig:
    return ModelConfig(name="1b", n_layers=16, d_model=2048, n_heads=8, lr=3e-4, micro_batch=16, fsdp=True)


def pythia_1_4b() -> ModelConfig:
    return ModelConfig(name="1.4b", n_layers=24, d_model=2048, n_heads=16, lr=2e-4, micro_batch=8, fsdp=True)


def pythia_2_8b() -> ModelConfig:
    return ModelConfig(name="2.8b", n_layers=32, d_model=2560, n_heads=32, lr=1.6e-4, micro_batch=4, fsdp=True)


def llama_0_5b() -> ModelConfig:
    """LLaMA-style 0.5B (SwiGLU, RMSNorm, full rotary), the other architecture the BLISS paper trains."""
    return ModelConfig(
        name="llama-0.5b", family="llama", n_layers=24, d_model=1024, n_heads=16, d_ff=4096, lr=3e-4,
        rotary_pct=1.0, micro_batch=16,
    )


PRESETS = {
    "tiny": pythia_tiny,
    "14m": pythia_14m,
    "31m": pythia_31m,
    "70m": pythia_70m,
    "160m": pythia_160m,
    "410m": pythia_410m,
    "1b": pythia_1b,
    "1.4b": pythia_1_4b,
    "2.8b": pythia_2_8b,
    "llama-0.5b": llama_0_5b,
}

def model_preset(name: str) -> ModelConfig:
    """The preset called ``name``; a one-line error listing the valid names otherwise."""
    try:
        return PRESETS[name.lower()]()
    except KeyError:
        raise UserError(f"unknown model size {name!r}; choose one of: {', '.join(PRESETS)}") from None


def with_max_seq_len(config: ModelConfig, seq_len: int) -> ModelConfig:
    """``config`` able to attend over ``seq_len`` positions (rotary: positions are free to grow)."""
    return replace(config, max_seq_len=max(config.max_seq_len, seq_len))
