"""``TrainScorerConfig``: everything ``train-scorer`` needs, shared by the CLI, the loop and the
outer step, and what a ``--resume`` must not change."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.models.presets import model_preset
from engine.run_dir import check_config_integers


@dataclass(frozen=True, kw_only=True)
class TrainScorerConfig:
    """Everything ``train-scorer`` needs; the CLI builds it from flags (names below are the flags)."""

    train: tuple[str, ...]
    """``--train``: files, folders or globs of training documents (the candidate pool)."""
    val: str
    """``--val``: the validation documents whose loss the score model learns to lower."""
    proxy: str = "14m"
    """``--proxy``: model preset of the proxy LM (and of the score model's backbone)."""
    steps: int = 200
    """``--steps``: outer (bilevel) steps."""
    warmup_steps: int = 100
    """``--warmup-steps``: plain LM steps of the proxy on random training data before the bilevel phase."""
    inner_steps: int = 5
    """``--inner-steps``: K, proxy AdamW steps per outer step."""
    gamma: float = 1e-2
    """``--gamma``: weight of KL(target ‖ proxy); ignored (0) without ``--target``."""
    l2: float = 1e-7
    """``--l2``: λ, weight of ‖θp‖² in the lower objective."""
    z_steps: int = 3
    """``--z-steps``: gradient steps of the linear solve (H + μI) z = v."""
    z_lr: float = 1e-2
    """``--z-lr``: η_z, step size of the z-solve."""
    z_damping: float = 1e-2
    """``--z-damping``: μ, added to the Hessian's diagonal."""
    z_clip: float = 1.0
    """``--z-clip``: per-tensor norm bound of each z update (0: no clipping)."""
    score_scale: float = 1.0
    """``--score-scale``: β in the batch weights P = softmax(β·s). Scores lie in (0, 1), so at the
    reference's β = 1 a batch's weights differ by at most e×: the proxy's lower level sees nearly uniform
    weights (entropy ≈ log B), and the score model's ranking has little room to act on it."""
    z_init: float = 0.0
    """``--z-init``: the constant z starts from at every outer step."""
    lr_proxy: float | None = None
    """``--lr-proxy``: peak learning rate of the proxy (default: the preset's Pythia learning rate)."""
    lr_scorer: float = 1e-4
    """``--lr-scorer``: peak learning rate of the score model."""
    weight_decay: float = 0.1
    """``--weight-decay``: AdamW weight decay of both models (matrices only)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """``--grad-clip``: global gradient-norm clipping of both models (0: off)."""
    lr_warmup_fraction: float = 0.1
    """Fraction of each cosine schedule spent warming the learning rate up linearly."""
    min_lr_ratio: float = 0.1
    """The cosine schedules end at this fraction of their peak."""
    batch_size: int = 32
    """``--batch-size``: training documents per inner step (and in the batch the score model is trained on)."""
    val_batch_size: int = 32
    """``--val-batch-size``: validation documents per outer step."""
    seq_len: int = 256
    """``--seq-len``: tokens per document (its first ``seq_len``; shorter ones are padded and masked)."""
    target: str | None = None
    """``--target``: pretraining checkpoint supplying the KL term; frozen, eval mode, no gradient."""
    proxy_init: str | None = None
    """``--proxy-init``: start the proxy from this model (a pretrain checkpoint or run, e.g. BLISS's
    round-0 model, or a train-scorer run's warmed-up proxy) instead of a fresh one; its preset and
    tokenizer are the run's. The proxy goes back to it at every fresh run, as each BLISS round does."""
    score_init: str | None = None
    """``--score-init``: start the score model from this earlier one (a train-scorer run or its
    ``score-model.pt``) instead of the proxy's backbone: BLISS's rounds continue the score model."""
    tokenizer: str | None = None
    """``--tokenizer``: tokenizer.json, folder or hub id; default: a BPE trained on ``--train``, saved in the run."""
    vocab_size: int = 8192
    """``--vocab-size``: vocabulary of the default BPE tokenizer."""
    device: str = "auto"
    """``--device``: ``cpu``, ``cuda`` or ``auto`` (cuda when available)."""
    hypergrad: str = "fd"
    """``--hypergrad``: ``fd`` (c_i by central differences at θp ± εz: two forward passes with the fast
    kernels, no graph; exact up to O(ε²)), or the exact references ``graph`` (one reverse pass through
    ∇θp g's graph, asking for θs only) and ``jvp`` (all c_i by forward mode). ``fd`` with ``z_hvp=fd``
    is the default because it selected as the exact route did at 0.57× of its cost per outer step beyond
    the inner steps (bench/README_bliss.md)."""
    z_hvp: str = "fd"
    """``--z-hvp``: how the z-solve multiplies by H: ``fd`` (the difference of two gradients at θp ± εx,
    fast kernels) or ``exact`` (double backward through ∇θp g's graph)."""
    fd_step: float = 1e-3
    """``--fd-step``: the finite-difference step as a share of ‖θp‖: ε = fd_step·‖θp‖/‖direction‖."""
    z_carry: bool = False
    """``--z-carry``: start each z-solve from the previous outer step's z instead of ``z_init`` (single
    loop: the solve then refines one z over training rather than starting afresh)."""
    hypergrad_chunk: int = 0
    """``--hypergrad-chunk``: documents per forward-mode pass of the ``jvp`` route (0: the whole batch);
    exact either way, a smaller chunk keeps that route's memory flat as the batch grows."""
    seed: int = 0
    """``--seed``: model init, data order and validation batches."""
    probe_docs: int = 256
    """``--probe-docs``: documents of the fixed probe set whose score histogram is logged."""
    histogram_every: int = 25
    """``--histogram-every``: outer steps between score histograms of the probe set."""
    checkpoint_every: int = 50
    """``--checkpoint-every``: steps (warm-up and outer) between checkpoints."""
    val_docs: int = 256
    """``--val-docs``: validation documents the final validation loss is measured on."""
    shuffle_buffer: int = 1024
    """``--shuffle-buffer``: documents shuffled together while streaming the pool."""
    resume: bool = False
    """``--resume``: continue from the run's last checkpoint."""
    tensorboard: bool = True
    """``--tensorboard/--no-tensorboard``: also write the figures as TensorBoard scalars in the run."""
    threads: int | None = None
    """``--threads``: torch threads (the CLI's default: ``engine.runtime.plan_threads``); None leaves
    torch's setting alone."""

    def __post_init__(self) -> None:
        check_config_integers(self)
        if isinstance(self.train, (str, Path)):
            object.__setattr__(self, "train", (str(self.train),))
        if not self.train:
            raise UserError("--train: give at least one file, folder or glob")
        model_preset(self.proxy)  # raises a one-line error naming the valid presets
        positive_ints = {
            "--steps": self.steps, "--inner-steps": self.inner_steps, "--batch-size": self.batch_size,
            "--val-batch-size": self.val_batch_size, "--histogram-every": self.histogram_every,
            "--checkpoint-every": self.checkpoint_every, "--val-docs": self.val_docs,
            "--shuffle-buffer": self.shuffle_buffer, "--probe-docs": self.probe_docs,
        }
        for flag, value in positive_ints.items():
            if value < 1:
                raise UserError(f"{flag} must be at least 1 (got {value})")
        for flag, value in {"--warmup-steps": self.warmup_steps, "--z-steps": self.z_steps,
                            "--hypergrad-chunk": self.hypergrad_chunk}.items():
            if value < 0:
                raise UserError(f"{flag} must be 0 or more (got {value})")
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be at least 2 (got {self.seq_len})")
        non_negative = {"--gamma": self.gamma, "--l2": self.l2, "--z-damping": self.z_damping,
                        "--z-clip": self.z_clip, "--weight-decay": self.weight_decay,
                        "--grad-clip": self.grad_clip}
        for flag, value in non_negative.items():
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"{flag} must be a finite number ≥ 0 (got {value})")
        positive = {"--z-lr": self.z_lr, "--lr-scorer": self.lr_scorer, "--score-scale": self.score_scale}
        if self.lr_proxy is not None:
            positive["--lr-proxy"] = self.lr_proxy
        for flag, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"{flag} must be a positive number (got {value})")
        if not (0 <= self.lr_warmup_fraction < 1 and 0 <= self.min_lr_ratio <= 1):
            raise UserError("learning-rate schedule: warm-up fraction must be in [0, 1), min ratio in [0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError("AdamW betas must be in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device must be cpu, cuda or auto (got {self.device!r})")
        if self.hypergrad not in HYPERGRAD_ROUTES:
            raise UserError(f"--hypergrad must be graph, jvp or fd (got {self.hypergrad!r})")
        if self.z_hvp not in ("exact", "fd"):
            raise UserError(f"--z-hvp must be exact or fd (got {self.z_hvp!r})")
        if not (0 < self.fd_step < 1 and math.isfinite(self.fd_step)):
            raise UserError(f"--fd-step must be in (0, 1) (got {self.fd_step})")
        if self.seed < 0:
            raise UserError(f"--seed must be 0 or more (got {self.seed})")


RESUME_KEYS = ("proxy", "seq_len", "batch_size", "steps", "warmup_steps", "inner_steps", "seed", "tokenizer",
               "vocab_size", "hypergrad", "z_hvp", "z_carry", "shuffle_buffer", "train", "val", "proxy_init",
               "score_init", "score_scale")
BEFORE_KEY = {"z_hvp": "exact", "z_carry": False, "proxy_init": None, "score_init": None, "score_scale": 1.0}
"""What a checkpoint written before a key existed ran with."""
HYPERGRAD_ROUTES = ("graph", "jvp", "fd")


def resume_keys(config: TrainScorerConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(config, k)) for k in RESUME_KEYS)}


def check_resumable(saved: dict[str, Any], config: TrainScorerConfig) -> None:
    """A resume must not silently change what the checkpoint means."""
    now = resume_keys(config)
    saved = {**BEFORE_KEY, **saved}
    changed = [k for k in RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} ({saved.get(k)!r} → {now[k]!r})" for k in changed)
        raise UserError(f"cannot resume: changed since the checkpoint: {flags}")
