"""``PretrainConfig``: everything one pretraining run needs, and the preset's defaults for it.

The launcher (``engine.pretrain.launch``) resolves it from the flags, the preset and, on ``--resume``,
the run's frozen copy; every rank's trainer reads that frozen copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import UserError
from engine.models.presets import PRESETS, ModelConfig, model_preset, with_max_seq_len
from engine.pretrain.schedule import SCHEDULES
from engine.run_dir import check_config_integers


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
    lr_schedule: str = "cosine"
    """``--lr-schedule``: ``cosine`` (Pythia), ``constant`` or ``wsd`` (``engine.pretrain.schedule``)."""
    decay_steps: int = 0
    """``--decay-steps``: after the last step, this many more steps of a linearly decaying rate on a
    side branch (``runs/<name>/decayed/``), evaluated there; the main line is left as it ended. 0: none."""
    init_from: str | None = None
    """``--init-from``: a pretrain checkpoint (or run) whose weights this run starts from, and whose AdamW
    state too unless ``reset_optimizer``: a model continued on new ``--data``."""
    reset_optimizer: bool = False
    """``--reset-optimizer``: with ``--init-from``, start AdamW's moments afresh."""
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
    tensorboard: bool = True
    """Also write the figures as TensorBoard scalars in the run (``--tensorboard/--no-tensorboard``)."""
    threads: int | None = None
    """Torch threads of each rank (``--threads``; the launcher's default: cores ÷ processes on the node,
    ``engine.runtime.plan_threads``); None leaves torch's setting alone."""

    def __post_init__(self) -> None:
        check_config_integers(self)
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
        if self.seed < 0:
            raise UserError(f"--seed must be 0 or more, got {self.seed}")
        if self.tokens is not None and self.tokens < 1:
            raise UserError(f"--tokens must be at least 1, got {self.tokens}")
        if self.steps is not None and self.tokens is not None:
            raise UserError("give --steps or --tokens, not both")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup_frac < 1:
            raise UserError(f"--warmup must be a fraction in [0, 1), got {self.warmup_frac}")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.decay_steps < 0:
            raise UserError(f"--decay-steps must be 0 or more, got {self.decay_steps}")
        if self.reset_optimizer and not self.init_from:
            raise UserError("--reset-optimizer only means something with --init-from")
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
    return {
        "lr": preset.lr,
        "global_batch_tokens": preset.batch_sequences * seq_len,
        "micro_batch": preset.micro_batch,
        "fsdp": preset.fsdp,
    }


def fit_batch_to_processes(values: dict, given: set[str], *, frozen: set[str] = frozenset()) -> list[str]:
    """Adjust the batch settings the user did not give so that ``world_size`` processes split the
    global batch evenly; returns a note for each change (the launcher prints them).

    ``values`` holds ``seq_len``, ``global_batch_tokens``, ``micro_batch`` and ``world_size`` and is
    changed in place. A setting in ``given`` (typed by the user) or ``frozen`` (fixed by the run being
    resumed) is never changed: a mismatch there stays an error, reported by ``PretrainConfig``.
    """
    notes: list[str] = []
    seq_len, world = values["seq_len"], values["world_size"]
    if seq_len < 1 or world < 1 or values["micro_batch"] < 1 or values["global_batch_tokens"] < seq_len:
        return notes  # PretrainConfig names the bad flag
    sequences = values["global_batch_tokens"] // seq_len
    fixed_batch = "global_batch_tokens" in given or "global_batch_tokens" in frozen
    fixed_micro = "micro_batch" in given or "micro_batch" in frozen
    if not fixed_batch:
        step = values["micro_batch"] * world if fixed_micro else world
        rounded = math.ceil(sequences / step) * step
        if rounded != sequences:
            notes.append(f"global batch {rounded} sequences ({rounded * seq_len:,} tokens) instead of {sequences}, "
                         f"so that {world} processes split it evenly")
            sequences = rounded
            values["global_batch_tokens"] = rounded * seq_len
    if not fixed_micro and sequences % world == 0:
        per_process = sequences // world
        default = values["micro_batch"]
        micro = max(d for d in range(1, min(default, per_process) + 1) if per_process % d == 0)
        if micro != default:
            notes.append(f"micro-batch {micro} per process (the default {default} does not divide the "
                         f"{per_process} sequences each of {world} process(es) takes a step)")
            values["micro_batch"] = micro
    return notes
