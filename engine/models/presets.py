"""Model presets of the Pythia (GPT-NeoX) family, plus LLaMA-0.5B, built from configs with random init.

Shared by the BLISS proxy/score models (``train-scorer``) and by ``pretrain``. Nothing is downloaded:
every model is built from a ``transformers`` config. Layer/width/head counts and learning rates follow
the Pythia suite (Biderman et al., 2023); rotary fraction 0.25, parallel residual, untied embeddings.
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

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise UserError(f"model {self.name}: width {self.d_model} is not divisible by {self.n_heads} heads")

    @property
    def mlp_width(self) -> int:
        return self.d_ff or 4 * self.d_model


def pythia_tiny() -> ModelConfig:
    """For tests and the demo: 2 layers, width 64."""
    return ModelConfig(name="tiny", n_layers=2, d_model=64, n_heads=4, max_seq_len=2048, lr=1e-3)


def pythia_14m() -> ModelConfig:
    return ModelConfig(name="14m", n_layers=6, d_model=128, n_heads=4, lr=1e-3)


def pythia_31m() -> ModelConfig:
    return ModelConfig(name="31m", n_layers=6, d_model=256, n_heads=8, lr=1e-3)


def pythia_70m() -> ModelConfig:
    return ModelConfig(name="70m", n_layers=6, d_model=512, n_heads=8, lr=1e-3)


def pythia_160m() -> ModelConfig:
    return ModelConfig(name="160m", n_layers=12, d_model=768, n_heads=12, lr=6e-4)


def pythia_410m() -> ModelConfig:
    return ModelConfig(name="410m", n_layers=24, d_model=1024, n_heads=16, lr=3e-4)


def pythia_1b() -> ModelConfig:
    return ModelConfig(name="1b", n_layers=16, d_model=2048, n_heads=8, lr=3e-4)


def pythia_1_4b() -> ModelConfig:
    return ModelConfig(name="1.4b", n_layers=24, d_model=2048, n_heads=16, lr=2e-4)


def pythia_2_8b() -> ModelConfig:
    return ModelConfig(name="2.8b", n_layers=32, d_model=2560, n_heads=32, lr=1.6e-4)


def llama_0_5b() -> ModelConfig:
    """LLaMA-style 0.5B (SwiGLU, RMSNorm, full rotary), the other architecture the BLISS paper trains."""
    return ModelConfig(
        name="llama-0.5b", family="llama", n_layers=24, d_model=1024, n_heads=16, d_ff=4096, lr=3e-4,
        rotary_pct=1.0,
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

PYTHIA_SIZES = [name for name, preset in PRESETS.items() if preset().family == "pythia"]


def model_preset(name: str) -> ModelConfig:
    """The preset called ``name``; a one-line error listing the valid names otherwise."""
    try:
        return PRESETS[name.lower()]()
    except KeyError:
        raise UserError(f"unknown model size {name!r}; choose one of: {', '.join(PRESETS)}") from None


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """Embedding rows rounded up (Pythia pads 50,277 to 50,304) for faster matmuls."""
    return (vocab_size + multiple - 1) // multiple * multiple


def hf_config(config: ModelConfig, vocab_size: int, attn_implementation: str = "sdpa"):
    """The ``transformers`` config for ``config`` with the run's tokenizer vocabulary."""
    vocab = padded_vocab_size(vocab_size)
    if config.family == "pythia":
        from transformers import GPTNeoXConfig

        hf = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=config.d_model,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            intermediate_size=config.mlp_width,
            max_position_embeddings=config.max_seq_len,
            rotary_pct=config.rotary_pct,
            rotary_emb_base=10000,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            initializer_range=0.02,
            bos_token_id=0,
            eos_token_id=0,
            attention_dropout=0.0,
            hidden_dropout=0.0,
        )
    elif config.family == "llama":
        from transformers import LlamaConfig

        hf = LlamaConfig(
            vocab_size=vocab,
            hidden_size=config.d_model,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_heads,
            intermediate_size=config.mlp_width,
            max_position_embeddings=config.max_seq_len,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=0,
        )
    else:  # pragma: no cover - guarded by the presets
        raise UserError(f"unknown model family {config.family!r}")
    hf._attn_implementation = attn_implementation
    return hf


def build_causal_lm(config: ModelConfig, vocab_size: int, *, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised causal LM for ``config`` (GPTNeoXForCausalLM or LlamaForCausalLM)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = hf_config(config, vocab_size, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf, attn_implementation=attn_implementation)
    return model


def count_parameters(model, *, exclude_embeddings: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= model.get_input_embeddings().weight.numel()
    return total


def with_max_seq_len(config: ModelConfig, seq_len: int) -> ModelConfig:
    """``config`` able to attend over ``seq_len`` positions (rotary: positions are free to grow)."""
    return replace(config, max_seq_len=max(config.max_seq_len, seq_len))
