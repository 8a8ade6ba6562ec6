"""How a preset becomes a network: the ``transformers`` config of each family (GPT-NeoX for Pythia,
LLaMA), built with random initialisation. Nothing is downloaded. A new family is one branch of
``hf_config`` and presets that name it."""

from __future__ import annotations

from engine.errors import UserError
from engine.models.presets import ModelConfig


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
