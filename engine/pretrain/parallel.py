"""Data parallelism for pretraining: DDP by default, FSDP2 (``fully_shard`` per transformer block) with
``fsdp=True``, and the full (unsharded) state dicts checkpoints hold either way."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any


def transformer_blocks(model) -> list:
    """The repeated blocks of a Pythia or LLaMA model: the units FSDP shards and gathers one at a time."""
    inner = getattr(model, "gpt_neox", None) or getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"cannot find transformer layers in {type(model).__name__}")
    return list(layers)


def apply_fsdp(model, *, mesh=None, bf16: bool = False):
    """FSDP2: ``fully_shard`` each block, then the root (embeddings, final norm, head)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def ddp_no_buffer_sync() -> dict:
    """DDP's flag for not broadcasting buffers every forward (renamed in recent PyTorch)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def full_state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


@dataclass
class ParallelModel:
    """The model as the training loop uses it.

    ``module`` is what the optimiser and checkpoints see, ``train`` what the forward pass calls (DDP
    wrapper or the FSDP-sharded module), ``evaluate`` what evaluation calls (the unwrapped module under
    DDP: it needs no collectives).
    """

    module: Any
    train: Any
    evaluate: Any
    autocast_dtype: Any | None
    """bf16 under DDP on CUDA; None on CPU and under FSDP (whose policy already computes in bf16)."""
    fsdp: bool
    in_group: bool
    device_type: str

    def gradient_sync(self, last_micro_batch: bool):
        """Accumulate locally and all-reduce once, on the last micro-batch of a step."""
        if self.fsdp and self.in_group:
            self.train.set_requires_gradient_sync(last_micro_batch)
            return nullcontext()
        if self.in_group and not last_micro_batch:
            return self.train.no_sync()
        return nullcontext()

    def autocast(self):
        import torch

        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def parallelise(model, *, fsdp: bool, runtime) -> ParallelModel:
    """Shard ``model`` with FSDP or wrap it in DDP on ``runtime``'s device (neither outside torchrun)."""
    import torch

    amp_dtype = torch.bfloat16 if runtime.cuda else None
    if fsdp and runtime.in_group:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(runtime.torch_device.type, (runtime.world_size,))
        model = apply_fsdp(model, mesh=mesh, bf16=runtime.cuda)  # moves the shards to the mesh's device
        return ParallelModel(module=model, train=model, evaluate=model, autocast_dtype=None, fsdp=True,
                             in_group=True, device_type=runtime.torch_device.type)
    model.to(runtime.torch_device)
    train_model = model
    if runtime.in_group:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The only buffers are rotary frequencies, identical everywhere: no per-forward broadcast.
        train_model = DDP(model, device_ids=[runtime.local_rank] if runtime.cuda else None, **ddp_no_buffer_sync())
    return ParallelModel(module=model, train=train_model, evaluate=model, autocast_dtype=amp_dtype, fsdp=False,
                         in_group=runtime.in_group, device_type=runtime.torch_device.type)
