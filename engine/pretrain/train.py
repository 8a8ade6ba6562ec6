"""Pretraining a Pythia-family (or LLaMA-0.5B) model from scratch on packed tokens.

``train(config)`` is the loop every rank runs under ``torchrun`` (``engine.pretrain.worker``); it also
runs in-process (one rank, no process group) for tests. One flat loop, nanoGPT style:

    while True:
        evaluate / checkpoint when due;  stop after the last step
        for each micro-batch: forward, loss / accum, backward   (gradient sync on the last only)
        clip, AdamW step, scheduler step; log

Parallelism: DDP by default, FSDP2 (``fully_shard`` per transformer block) with ``fsdp=True``.
On CUDA: NCCL, bf16 (autocast for DDP, FSDP's mixed-precision policy for FSDP), TF32 matmuls; on
CPU: gloo and float32. Attention is PyTorch SDPA (``transformers``' ``sdpa`` implementation).

Data order is a seeded permutation of sequence indices per epoch; sequence ``p`` of the run (counting
from 0 over all steps) is a pure function of ``(seed, p)``, so a resumed run, or one on a different
number of ranks, reads exactly the same sequences at the same steps.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.models.presets import PRESETS, ModelConfig, model_preset, with_max_seq_len

# Pythia trained every size with 1024 sequences × 2048 tokens (~2M tokens) a step. Micro-batches are
# per-GPU sizes that fit an 80–141 GB accelerator in bf16 at 2048 tokens.
DEFAULT_BATCH_SEQUENCES = {"tiny": 32}
PYTHIA_BATCH_SEQUENCES = 1024
DEFAULT_MICRO_BATCH = {
    "tiny": 32, "14m": 32, "31m": 32, "70m": 32, "160m": 32, "410m": 16,
    "1b": 16, "1.4b": 8, "2.8b": 4, "llama-0.5b": 16,
}
FSDP_BY_DEFAULT = {"1b", "1.4b", "2.8b"}
"""Presets that default to FSDP: with DDP every GPU would hold the whole model and AdamW state."""


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Everything one pretraining run needs; frozen into ``runs/<name>/pretrain_config.json``."""

    run_dir: str
    """The run directory (``--runs-dir``/``--run``): packed data, checkpoints and events go here."""
    size: str
    """Model preset (``--size``): tiny, 14m, 31m, 70m, 160m, 410m, 1b, 1.4b, 2.8b, llama-0.5b."""
    data: tuple[str, ...]
    """Training input (``--data``): a ``select`` output folder or JSONL shards (files, folders, globs)."""
    val: str | None = None
    """Held-out documents (``--val``) for the validation loss; none means no evaluation."""
    tokenizer: str | None = None
    """Tokenizer the user asked for (``--tokenizer``); the run always uses its own saved copy."""
    seq_len: int = 2048
    """Tokens per training sequence (``--seq-len``)."""
    lr: float
    """Peak learning rate (``--lr``); the preset's Pythia value by default."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak (Pythia: 10%)."""
    warmup_frac: float = 0.01
    """Fraction of the steps spent in linear warm-up (``--warmup``; Pythia: 1%)."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on biases and norms); Pythia: 0.01."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    global_batch_tokens: int
    """Tokens per optimiser step over all ranks (``--global-batch-tokens``)."""
    micro_batch: int
    """Sequences per rank per forward/backward (``--micro-batch``); accumulation makes up the rest."""
    steps: int | None = None
    """Optimiser steps (``--steps``); resolved from ``--tokens`` or one epoch of the data if not given."""
    tokens: int | None = None
    """Training tokens (``--tokens``), rounded up to whole steps; an alternative to ``--steps``."""
    world_size: int = 1
    """Processes over all nodes (``--nproc-per-node`` × ``--nnodes``)."""
    seed: int = 0
    """Seeds the model initialisation and the data order (``--seed``)."""
    save_every: int = 1000
    """Checkpoint every this many steps (``--save-every``); the last step is always saved."""
    keep: int = 3
    """Checkpoints kept on disk (``--keep``), newest first."""
    eval_every: int = 1000
    """Validation loss every this many steps (``--eval-every``) and at the end."""
    eval_tokens: int = 1 << 20
    """At most this many validation tokens per in-training evaluation (``--eval-tokens``)."""
    log_every: int = 10
    """A ``step`` event every this many steps (``--log-every``)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimiser state with FSDP (``--fsdp``) instead of DDP."""
    compile: bool = False
    """``torch.compile`` each transformer block (``--compile``)."""
    device: str = "auto"
    """``auto`` (CUDA if present), ``cuda`` or ``cpu`` (``--device``)."""

    def __post_init__(self) -> None:
        if self.size not in PRESETS:
            raise UserError(f"unknown model size {self.size!r} for --size; choose one of: {', '.join(PRESETS)}")
        if not self.data:
            raise UserError("--data is required: a select output (runs/NAME/selected) or JSONL shards")
        positive = {
            "--seq-len": self.seq_len, "--global-batch-tokens": self.global_batch_tokens,
            "--micro-batch": self.micro_batch, "--save-every": self.save_every, "--keep": self.keep,
            "--eval-every": self.eval_every, "--eval-tokens": self.eval_tokens, "--log-every": self.log_every,
            "--nproc-per-node × --nnodes": self.world_size,
        }
        for flag, value in positive.items():
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.tokens is not None and self.tokens < 1:
            raise UserError(f"--tokens must be at least 1, got {self.tokens}")
        if self.steps is not None and self.tokens is not None:
            raise UserError("give --steps or --tokens, not both")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup_frac < 1:
            raise UserError(f"--warmup must be a fraction in [0, 1), got {self.warmup_frac}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.global_batch_tokens % self.seq_len:
            raise UserError(
                f"--global-batch-tokens {self.global_batch_tokens} is not a multiple of --seq-len {self.seq_len}"
            )
        per_step = self.micro_batch * self.world_size
        if self.batch_sequences % per_step:
            raise UserError(
                f"--micro-batch {self.micro_batch} × {self.world_size} process(es) does not divide the global "
                f"batch of {self.batch_sequences} sequences (--global-batch-tokens / --seq-len)"
            )

    @property
    def batch_sequences(self) -> int:
        """Sequences per optimiser step over all ranks."""
        return self.global_batch_tokens // self.seq_len

    @property
    def grad_accum(self) -> int:
        """Micro-batches each rank accumulates per step."""
        return self.batch_sequences // (self.micro_batch * self.world_size)

    @property
    def model(self) -> ModelConfig:
        return with_max_seq_len(model_preset(self.size), self.seq_len)

    def total_steps(self, train_tokens: int) -> int:
        """Steps from ``--steps``, else ``--tokens``, else one epoch of ``train_tokens`` (at least 1)."""
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return math.ceil(self.tokens / self.global_batch_tokens)
        return max(1, train_tokens // self.global_batch_tokens)


def preset_training_defaults(size: str, seq_len: int) -> dict:
    """Batch, micro-batch, learning rate and sharding of preset ``size`` at ``seq_len``."""
    preset = model_preset(size)
    sequences = DEFAULT_BATCH_SEQUENCES.get(preset.name, PYTHIA_BATCH_SEQUENCES)
    return {
        "lr": preset.lr,
        "global_batch_tokens": sequences * seq_len,
        "micro_batch": DEFAULT_MICRO_BATCH.get(preset.name, 8),
        "fsdp": preset.name in FSDP_BY_DEFAULT,
    }


# --- pure helpers ---------------------------------------------------------------------------------


class SequenceOrder:
    """Sequence index for each position of the run: a fresh seeded permutation every epoch."""

    def __init__(self, n_sequences: int, seed: int):
        if n_sequences < 1:
            raise UserError("the training data is shorter than one sequence; lower --seq-len or add data")
        self.n = n_sequences
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sequence indices of run positions ``start … start+count-1``."""
        out = np.empty(count, dtype=np.int64)
        for i, pos in enumerate(range(start, start + count)):
            epoch, offset = divmod(pos, self.n)
            out[i] = self.permutation(epoch)[offset]
        return out


def micro_batch_start(step: int, micro: int, *, rank: int, world_size: int, micro_batch: int,
                      batch_sequences: int) -> int:
    """First run position of the micro-batch ``micro`` of ``rank`` at ``step``: ranks interleave."""
    return step * batch_sequences + (micro * world_size + rank) * micro_batch


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


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not biases, norms): nanoGPT/Pythia practice."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- distributed setup ----------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this rank runs: device, rank, world and whether a process group is up."""

    device: object
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False
    cuda: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_pref: str) -> Runtime:
    """Read torchrun's environment, pick the device and start the process group (NCCL or gloo)."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible")
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    distributed = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Runtime(device=device, rank=rank, local_rank=local_rank, world_size=world,
                   distributed=distributed, cuda=cuda)


def teardown_runtime(runtime: Runtime) -> None:
    import torch.distributed as dist

    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


# --- the trainer ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    losses: dict[int, float]
    """Training loss of each logged step."""
    loss_val: float | None
    elapsed_s: float
    checkpoint: Path | None


def _no_buffer_sync() -> dict:
    """DDP's flag for not broadcasting buffers every forward (renamed in recent PyTorch)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def train(config: PretrainConfig, *, resume: bool = False, stop_after: int | None = None,
          runtime: Runtime | None = None, quiet: bool = False) -> TrainResult:
    """Run (or continue, with ``resume``) the pretraining described by ``config`` on this rank.

    ``stop_after`` ends this invocation after that many steps (with a checkpoint), as a time-limited
    job would; ``--resume`` continues it on the same schedule.
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from engine.data.packing import open_packed
    from engine.eval.evaluate import summed_nll
    from engine.models import checkpoints as ckpts
    from engine.models.presets import build_causal_lm, count_parameters
    from engine.pretrain.schedule import CosineWithWarmup
    from engine.run_dir import RunDir, config_to_dict

    rt = runtime or setup_runtime(config.device)
    run = RunDir(Path(config.run_dir))
    data_dir = run.root / "data"
    train_data = open_packed(data_dir, "train")
    val_data = open_packed(data_dir, "val") if (data_dir / "val.json").exists() and config.val else None
    if config.steps is None:
        raise UserError("the config has no resolved --steps (prepare the run with blissctl pretrain)")
    if rt.world_size != config.world_size:
        raise UserError(f"config is for {config.world_size} processes but torchrun started {rt.world_size}")
    seq_len, total_steps = config.seq_len, config.steps
    events = run.events("pretrain", enabled=rt.is_main)
    say = (lambda *a: print(*a, flush=True)) if rt.is_main and not quiet else (lambda *a: None)

    # ---- model, parallelism, optimiser, schedule
    model_cfg = config.model
    vocab_size = int(train_data.header["vocab_size"])
    model = build_causal_lm(model_cfg, vocab_size, seed=config.seed)
    n_params = count_parameters(model)
    flops_token = flops_per_token(model_cfg, count_parameters(model, exclude_embeddings=True), seq_len)
    if config.compile:
        for block in transformer_blocks(model):
            block.compile()
    amp_dtype = torch.bfloat16 if rt.cuda else None
    if config.fsdp and rt.distributed:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(rt.device.type, (rt.world_size,))
        model = apply_fsdp(model, mesh=mesh, bf16=rt.cuda)  # moves the shards to the mesh's device
        autocast_dtype = None  # FSDP's policy already computes in bf16
        train_model = eval_model = model
    else:
        model.to(rt.device)
        autocast_dtype = amp_dtype
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # The only buffers are rotary frequencies, identical everywhere: no per-forward broadcast.
            train_model = DDP(model, device_ids=[rt.local_rank] if rt.cuda else None, **_no_buffer_sync())
        else:
            train_model = model
        eval_model = model  # the unwrapped module: evaluation needs no collectives under DDP
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2),
        eps=1e-8, fused=rt.cuda,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, CosineWithWarmup(total_steps, config.warmup_frac, config.min_lr_ratio)
    )

    # ---- resume
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    resumed_from = None
    latest = ckpts.latest_checkpoint(run.checkpoints)
    if latest is not None and not resume:
        raise UserError(f"{run.root} already has checkpoints; pass --resume to continue it")
    if resume and latest is not None:
        state = ckpts.read_trainer_state(latest)
        options = _state_dict_options()
        model_state = torch.load(latest / "model.pt", map_location="cpu", weights_only=True)
        set_model_state_dict(model, model_state, options=options)
        optim_state = torch.load(latest / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
        del model_state, optim_state
        scheduler.load_state_dict(state["scheduler"])
        # The saved state carries the old schedule's length; a resume with a new --steps follows the new
        # one from here (with the same --steps the learning rate is bit-for-bit what it would have been).
        schedule = CosineWithWarmup(total_steps, config.warmup_frac, config.min_lr_ratio)
        scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
        rng_states = torch.load(latest / "rng.pt", map_location="cpu", weights_only=True)
        if rt.rank < len(rng_states):
            ckpts.restore_rng_state(rng_states[rt.rank])
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        resumed_from = latest.name
        say(f"resumed from {latest} at step {step}")
    else:
        torch.manual_seed(config.seed + rt.rank)
        np.random.seed(config.seed + rt.rank)

    start_step = step
    order = SequenceOrder(train_data.n_sequences(seq_len), config.seed)
    accum = config.grad_accum
    peak = peak_flops(torch.cuda.get_device_name(rt.device)) if rt.cuda else None
    stop_at = total_steps if stop_after is None else min(total_steps, step + stop_after)
    events.emit(
        "start", size=config.size, params=n_params, world_size=rt.world_size, steps=total_steps,
        start_step=step, resumed_from=resumed_from, seq_len=seq_len,
        global_batch_tokens=config.global_batch_tokens, micro_batch=config.micro_batch, grad_accum=accum,
        fsdp=config.fsdp, device=str(rt.device.type), train_tokens=train_data.n_tokens,
    )
    say(f"pretrain {config.size}: {n_params / 1e6:.1f}M params, {rt.world_size} process(es) on "
        f"{rt.device.type}, {'FSDP' if config.fsdp else 'DDP'}, steps {step}→{total_steps}, "
        f"{config.global_batch_tokens:,} tokens/step ({accum} micro-batch(es) of {config.micro_batch} per rank)")

    def get_batch(step: int, micro: int):
        start = micro_batch_start(step, micro, rank=rt.rank, world_size=rt.world_size,
                                  micro_batch=config.micro_batch, batch_sequences=config.batch_sequences)
        idx = order.indices(start, config.micro_batch)
        rows = np.stack([train_data.sequence(int(i), seq_len) for i in idx]).astype(np.int64)
        xy = torch.from_numpy(rows)  # (B, T+1)
        if rt.cuda:
            xy = xy.pin_memory().to(rt.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]  # inputs (B, T), targets (B, T)

    def validation_loss() -> float | None:
        if val_data is None:
            return None
        nll, count = summed_nll(
            eval_model, val_data.tokens, seq_len=seq_len, batch_size=config.micro_batch, device=rt.device,
            autocast_dtype=autocast_dtype, rank=rt.rank, world_size=rt.world_size,
            max_tokens=config.eval_tokens, pad_id=int(val_data.header["eot_id"]),
        )
        return nll / max(count, 1)

    def save_checkpoint(step: int) -> Path | None:
        options = _state_dict_options(cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
        rng = ckpts.capture_rng_state()
        rng_states = [None] * rt.world_size
        if rt.distributed:
            dist.all_gather_object(rng_states, rng)
        else:
            rng_states = [rng]
        path = None
        if rt.is_main:
            path = ckpts.write_checkpoint(
                run.checkpoints, step, model_state=model_state, optimizer_state=optim_state,
                trainer_state={
                    "step": step, "tokens_seen": tokens_seen, "sequences_seen": step * config.batch_sequences,
                    "scheduler": scheduler.state_dict(), "elapsed_s": elapsed_before + time.perf_counter() - t0,
                    "world_size": rt.world_size,
                },
                rng_states=rng_states,
                meta={"model": config_to_dict(model_cfg), "vocab_size": vocab_size, "seq_len": seq_len,
                      "size": config.size, "tokens_seen": tokens_seen},
                tokenizer_path=run.tokenizer_path, keep=config.keep,
            )
            events.emit("checkpoint", step=step, path=str(path))
        if rt.distributed:
            dist.barrier()
        return path

    def sync_context(micro: int):
        last = micro == accum - 1
        if config.fsdp and rt.distributed:
            train_model.set_requires_gradient_sync(last)
            return nullcontext()
        if rt.distributed and not last:
            return train_model.no_sync()  # accumulate locally; all-reduce once, on the last micro-batch
        return nullcontext()

    amp = (lambda: torch.autocast(rt.device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    losses: dict[int, float] = {}
    loss_val = None
    last_checkpoint = None
    train_model.train()
    t0 = time.perf_counter()
    t_log, tokens_at_log = t0, tokens_seen
    while True:
        last_step = step == stop_at
        if val_data is not None and step > start_step and (step % config.eval_every == 0 or step == total_steps):
            loss_val = validation_loss()
            events.emit("eval", step=step, loss_val=loss_val)
            say(f"step {step}: val loss {loss_val:.4f}")
            t_log = time.perf_counter()  # evaluation time is not training throughput
        if step > start_step and (step % config.save_every == 0 or last_step):
            last_checkpoint = save_checkpoint(step)
            t_log = time.perf_counter()
        if last_step:
            break

        # ---- one optimiser step over `accum` micro-batches
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(accum):
            inputs, targets = get_batch(step, micro)
            with sync_context(micro), amp():
                logits = train_model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            # Mean over micro-batches: each backward carries 1/accum of its gradient.
            (loss / accum).backward()
            loss_sum += loss.detach()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += config.global_batch_tokens

        if step % config.log_every == 0 or step == stop_at:
            loss_mean = loss_sum / accum
            if rt.distributed:
                dist.all_reduce(loss_mean, op=dist.ReduceOp.AVG)
            loss_value = float(loss_mean)  # synchronises with the device: the timing below is honest
            now = time.perf_counter()
            tokens_per_s = (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
            t_log, tokens_at_log = now, tokens_seen
            losses[step] = loss_value
            figures = {"step": step, "total_steps": total_steps, "loss": loss_value, "lr": lr,
                       "tokens_per_s": round(tokens_per_s, 1), "tokens_seen": tokens_seen}
            if peak is not None:
                figures["mfu"] = round(model_flops_utilisation(tokens_per_s, flops_token, peak, rt.world_size), 4)
            events.emit("step", **figures)
            mfu_text = f" | mfu {figures['mfu']:.1%}" if "mfu" in figures else ""
            say(f"step {step}/{total_steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s{mfu_text}")

    elapsed = elapsed_before + time.perf_counter() - t0
    if step == total_steps:
        events.emit("done", steps=step, tokens_seen=tokens_seen, elapsed_s=round(elapsed, 3), loss_val=loss_val)
        say(f"done: {step} steps, {tokens_seen:,} tokens in {elapsed:.1f}s"
            + (f", val loss {loss_val:.4f}" if loss_val is not None else ""))
    else:
        events.emit("stopped", step=step, tokens_seen=tokens_seen, elapsed_s=round(elapsed, 3))
        say(f"stopped after step {step} of {total_steps}; continue with --resume")
    events.close()
    return TrainResult(steps=step, tokens_seen=tokens_seen, losses=losses, loss_val=loss_val,
                       elapsed_s=elapsed, checkpoint=last_checkpoint)
