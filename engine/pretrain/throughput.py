"""Model FLOPs utilisation: how much of the accelerators' peak the training achieves."""

from __future__ import annotations

from engine.models.presets import ModelConfig


def flops_per_token(model: ModelConfig, non_embedding_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention's 12·L·d·T (PaLM, appendix B)."""
    return 6.0 * non_embedding_params + 12.0 * model.n_layers * model.d_model * seq_len


# Dense bf16 peak FLOP/s per device (vendor data sheets), matched on the CUDA device name.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a CUDA device from its name, ``None`` if unknown (then no MFU is reported)."""
    upper = device_name.upper()
    for key, flops in PEAK_BF16_FLOPS:
        if key in upper:
            return flops
    return None


def model_flops_utilisation(tokens_per_s: float, flops_token: float, peak_per_device: float,
                            world_size: int) -> float:
    """Fraction of the devices' combined peak the training achieves."""
    return tokens_per_s * flops_token / (peak_per_device * world_size)
