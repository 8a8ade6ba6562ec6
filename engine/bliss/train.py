"""``train-scorer``: learn the BLISS score model by bilevel optimisation against a small proxy LM.

One flat loop (nanoGPT style). First the proxy is warmed up on randomly chosen training documents and
saved (``checkpoints/proxy-warmup.pt``); the score model starts as a copy of its backbone. Then each
outer step (BLISS.md):

1. K inner AdamW steps of the proxy on g = Σ P_i L_i + γ·KL(target ‖ proxy) + λ‖θp‖², P = softmax of
   the (detached) scores over the batch;
2. v = ∇θp F on a validation batch;
3. z ≈ (H + μI)⁻¹ v by a few gradient steps with Hessian-vector products, H = ∇²θp g on a fresh
   training batch whose weights stay attached to the score model;
4. the hypergradient −∇²θs,θp g · z in one reverse pass through the graph of ∇θp g (or by ``jvp``);
5. one AdamW step of the score model.

Everything needed to continue (both models, both optimisers, the schedules' positions, the data
position and the RNG states) is checkpointed atomically; ``resume=True`` continues from there and
gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.bliss import bilevel
from engine.bliss.score_model import ScoreModel, save_score_model
from engine.data.collate import collate
from engine.data.sources import SkipCounts, discover_shards, read_documents
from engine.data.tokenizer import PADDING, end_of_text_id, resolve_tokenizer, training_sample
from engine.errors import UserError
from engine.models.presets import build_causal_lm, count_parameters, model_preset, with_max_seq_len
from engine.pretrain.schedule import lr_multiplier, warmup_steps
from engine.run_dir import RunDir, atomic_write_with

STATE_FILE = "train-scorer-state.pt"
SCORE_MODEL_FILE = "score-model.pt"
WARMUP_FILE = "proxy-warmup.pt"
HISTOGRAM_BINS = 50
MAX_VAL_DOCS = 100_000
"""Validation documents held in memory (tokenised) to draw validation batches from."""


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
    tokenizer: str | None = None
    """``--tokenizer``: tokenizer.json, folder or hub id; default: a BPE trained on ``--train``, saved in the run."""
    vocab_size: int = 8192
    """``--vocab-size``: vocabulary of the default BPE tokenizer."""
    device: str = "auto"
    """``--device``: ``cpu``, ``cuda`` or ``auto`` (cuda when available)."""
    hypergrad: str = "graph"
    """``--hypergrad``: ``graph`` (one reverse pass through ∇θp g's graph) or ``jvp`` (forward-mode c_i)."""
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

    def __post_init__(self) -> None:
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
        positive = {"--z-lr": self.z_lr, "--lr-scorer": self.lr_scorer}
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
        if self.hypergrad not in ("graph", "jvp"):
            raise UserError(f"--hypergrad must be graph or jvp (got {self.hypergrad!r})")


@dataclass(frozen=True)
class TrainScorerResult:
    """What the CLI's summary shows."""

    steps: int
    elapsed_s: float
    loss_val: float
    score_model: Path
    warmup_checkpoint: Path | None
    skipped: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Data: a resumable, shuffled stream of tokenised training documents


class DocumentStream:
    """Endless stream of training documents (first ``seq_len`` tokens, at least 2), shuffled and resumable.

    Each epoch visits the shards in a seeded order; each shard is read in chunks of ``buffer`` documents,
    each chunk permuted by an RNG seeded with (seed, epoch, shard, chunk). A position (epoch, shard slot,
    documents consumed in that shard) therefore determines everything that follows, so a resume re-reads
    at most one shard and tokenises at most one chunk before it is back where it stopped.
    """

    def __init__(self, shards: Sequence[Path], encode: Callable[[list[str]], list[np.ndarray]], *,
                 seed: int, buffer: int, position: dict[str, int] | None = None):
        self.shards = list(shards)
        self.encode = encode
        self.seed = seed
        self.buffer = buffer
        position = position or {"epoch": 0, "shard": 0, "offset": 0}
        self.position = dict(position)
        self.skips = SkipCounts()
        self.too_short = 0
        self._docs = self._generate(position["epoch"], position["shard"], position["offset"])

    def _generate(self, epoch: int, shard_slot: int, offset: int) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
        while True:
            yielded = 0
            started_at_beginning = shard_slot == 0 and offset == 0
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            for slot in range(shard_slot, len(order)):
                shard_index = int(order[slot])
                chunk: list[str] = []
                chunk_index = 0
                docs = read_documents([self.shards[shard_index]], self.skips)
                while True:
                    doc = next(docs, None)
                    if doc is not None:
                        chunk.append(doc.text)
                        if len(chunk) < self.buffer:
                            continue
                    if chunk:
                        start = chunk_index * self.buffer
                        if start + len(chunk) > offset:
                            perm = np.random.default_rng([self.seed, epoch, shard_index, chunk_index]).permutation(
                                len(chunk))
                            first = max(offset - start, 0)
                            texts = [chunk[i] for i in perm[first:]]
                            for j, tokens in enumerate(self.encode(texts)):
                                where = {"epoch": epoch, "shard": slot, "offset": start + first + j + 1}
                                if len(tokens) >= 2:
                                    yielded += 1
                                    yield tokens, where
                                else:
                                    self.too_short += 1
                        chunk = []
                        chunk_index += 1
                    if doc is None:
                        break
                offset = 0
            if yielded == 0 and started_at_beginning:  # a whole epoch without one usable document
                raise UserError("no training document has 2 or more tokens; check --train")
            epoch, shard_slot = epoch + 1, 0

    def next_batch(self, n: int) -> list[np.ndarray]:
        """The next ``n`` documents' token ids (int32 arrays); advances the position."""
        batch = []
        for _ in range(n):
            tokens, where = next(self._docs)
            batch.append(tokens)
            self.position = where
        return batch


def make_encoder(tokenizer, seq_len: int) -> Callable[[list[str]], list[np.ndarray]]:
    """Texts → int32 arrays of their first ``seq_len`` token ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length=seq_len)
    max_chars = seq_len * 32  # a token is rarely longer; spares tokenising whole books for 256 tokens

    def encode(texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        encodings = tok.encode_batch([t[:max_chars] for t in texts])
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    return encode


def tokenised_documents(paths: Sequence[Path], encode, limit: int, skips: SkipCounts | None = None) -> list[np.ndarray]:
    """The first ``limit`` documents of ``paths`` with at least 2 tokens, in reading order."""
    out: list[np.ndarray] = []
    texts: list[str] = []
    for doc in read_documents(paths, skips):
        texts.append(doc.text)
        if len(texts) >= 256:
            out.extend(t for t in encode(texts) if len(t) >= 2)
            texts = []
            if len(out) >= limit:
                break
    out.extend(t for t in encode(texts) if len(t) >= 2)
    return out[:limit]


# ----------------------------------------------------------------------------------------------------
# Small pieces of the loop


def cosine_lr(step: int, total: int, peak: float, warmup_fraction: float, min_ratio: float) -> float:
    """The pretraining schedule (``engine.pretrain.schedule``) as an absolute rate: warm-up, then cosine to min_ratio·peak."""
    return peak * lr_multiplier(step, total_steps=total, warmup=warmup_steps(total, warmup_fraction), min_ratio=min_ratio)


def make_adamw(model: torch.nn.Module, config: TrainScorerConfig, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norms), as in GPT-NeoX."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(config.beta1, config.beta2))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    if max_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine")
    return torch.device(spec)


def load_target(path: str, device: torch.device) -> tuple[torch.nn.Module, Path | None]:
    """The frozen target LM and its tokenizer: a pretrain checkpoint folder or run directory (latest
    checkpoint), or a ``save_pretrained`` folder. Eval mode, no gradient."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "meta.json").exists():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True)
        tokenizer_path = p / "tokenizer.json" if (p / "tokenizer.json").is_file() else None
    else:
        from engine.models.checkpoints import load_pretrained_model

        model, tokenizer_path = load_pretrained_model(p)
        tokenizer_path = Path(tokenizer_path) if tokenizer_path and Path(tokenizer_path).is_file() else None
    model.eval().requires_grad_(False)
    return model.to(device), tokenizer_path


def check_target_vocab(target: torch.nn.Module, vocab_size: int, path: str) -> None:
    from engine.models.presets import padded_vocab_size

    if target.config.vocab_size != padded_vocab_size(vocab_size):
        raise UserError(
            f"--target {path}: its vocabulary ({target.config.vocab_size}) does not match this run's tokenizer "
            f"({padded_vocab_size(vocab_size)}); train the scorer with the target's tokenizer (--tokenizer)")


def autocast(device: torch.device):
    """bf16 autocast on CUDA for plain forward/backward; a no-op context on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _lm_loss_terms(proxy, target, ids, mask, weights, config, gamma):
    """g and its parts for one batch: (g, weighted CE, per-sample losses (B,))."""
    logits = bilevel.lm_logits(proxy, ids, mask)
    losses = bilevel.sequence_losses(logits, ids, mask)  # (B,)
    kl = None
    if target is not None and gamma:
        with torch.no_grad():
            target_logits = bilevel.lm_logits(target, ids, mask)  # (B, T, V), frozen
        kl = bilevel.token_kl(logits, target_logits, mask)
    g = bilevel.lower_objective(losses, weights, list(proxy.parameters()), gamma=gamma, l2=config.l2, kl=kl)
    return g, losses


@torch.no_grad()
def score_documents(score_model: ScoreModel, docs: Sequence[np.ndarray], pad_id: int, device: torch.device,
                    batch_size: int = 64) -> np.ndarray:
    """float32 (N,) scores of tokenised documents."""
    was_training = score_model.training
    score_model.eval()
    out = []
    for i in range(0, len(docs), batch_size):
        ids, mask = collate(docs[i : i + batch_size], pad_id, device)
        with autocast(device):
            out.append(score_model(ids, mask).float().cpu().numpy())
    score_model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def validation_loss(proxy, docs: Sequence[np.ndarray], pad_id: int, device: torch.device, batch_size: int = 32) -> float:
    """Mean per-document next-token cross-entropy of ``proxy`` on ``docs``."""
    total, n = 0.0, 0
    for i in range(0, len(docs), batch_size):
        ids, mask = collate(docs[i : i + batch_size], pad_id, device)
        with autocast(device):
            losses = bilevel.sequence_losses(bilevel.lm_logits(proxy, ids, mask), ids, mask)
        total += float(losses.float().sum())
        n += len(losses)
    return total / max(n, 1)


def score_histogram(scores: np.ndarray) -> tuple[list[float], list[int]]:
    counts, edges = np.histogram(scores, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return [round(float(e), 6) for e in edges], [int(c) for c in counts]


@dataclass(frozen=True)
class OuterStepFigures:
    """What one outer step reports (the ``step`` event)."""

    loss_lower: float
    loss_upper: float
    hypergrad_norm: float
    z_residual: float
    weight_entropy: float
    lr_scorer: float
    lr_proxy: float


class PhaseTimer:
    """Wall time per named phase, summed over calls (the outer-step benchmark reads it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def outer_step(*, proxy: torch.nn.Module, score_model: ScoreModel, target: torch.nn.Module | None,
               opt_proxy: torch.optim.Optimizer, opt_scorer: torch.optim.Optimizer,
               train_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               val_batch: tuple[torch.Tensor, torch.Tensor], config: TrainScorerConfig, gamma: float, step: int,
               lr_proxy: float, timer: PhaseTimer | None = None) -> OuterStepFigures:
    """One BLISS outer step (BLISS.md): K inner steps, v, z-solve, hypergradient, upper step.

    ``train_batches`` yields K + 1 (ids, mask) batches: K for the inner steps, one for the z-solve and
    the hypergradient. ``step`` is the number of outer steps done before this one (for the schedules).
    """
    device = next(proxy.parameters()).device
    timed = timer or (lambda name: contextlib.nullcontext())
    proxy_params = list(proxy.parameters())
    score_params = list(score_model.parameters())

    # 1. K inner steps on g with the current (detached) weights; bf16 autocast on CUDA.
    lower = 0.0
    with timed("inner"):
        for k in range(config.inner_steps):
            set_lr(opt_proxy, cosine_lr(step * config.inner_steps + k, config.steps * config.inner_steps, lr_proxy,
                                        config.lr_warmup_fraction, config.min_lr_ratio))
            ids, mask = next(train_batches)
            with autocast(device):
                with torch.no_grad():
                    weights = bilevel.batch_weights(score_model(ids, mask).float())  # (B,)
                g, _ = _lm_loss_terms(proxy, target, ids, mask, weights, config, gamma)
            g.backward()
            clip_and_step(proxy, opt_proxy, config.grad_clip)
            lower += g.item() / config.inner_steps

    # 2. Validation gradient v = ∇θp F.
    with timed("validation_gradient"):
        ids, mask = val_batch
        with autocast(device):
            loss_upper = bilevel.sequence_losses(bilevel.lm_logits(proxy, ids, mask), ids, mask).mean()
        v = [t.float() for t in torch.autograd.grad(loss_upper, proxy_params)]

    # 3-4. z-solve and hypergradient on a fresh batch, weights attached to the score model; fp32 and the
    # MATH attention kernel (double backward / forward-mode AD).
    ids, mask = next(train_batches)
    with timed("score_forward"):
        scores = score_model(ids, mask)  # (B,)
        weights = bilevel.batch_weights(scores)
    with bilevel.differentiable_attention():
        with timed("lower_gradient_graph"):
            attached = weights if config.hypergrad == "graph" else weights.detach()
            g, _ = _lm_loss_terms(proxy, target, ids, mask, attached, config, gamma)
            grad_g = torch.autograd.grad(g, proxy_params, create_graph=True)
        with timed("z_solve"):
            z = bilevel.solve_z(grad_g, proxy_params, v, steps=config.z_steps, lr=config.z_lr,
                                damping=config.z_damping, clip=config.z_clip, init=config.z_init)
        with timed("hypergradient"):
            if config.hypergrad == "graph":
                mixed, hz = bilevel.mixed_second_derivative(grad_g, proxy_params, score_params, z)
                hypergrad = [-m for m in mixed]
            else:
                hz = bilevel.hessian_vector_product(grad_g, proxy_params, z)
                del grad_g
                names = [name for name, _ in proxy.named_parameters()]
                _, c = bilevel.per_sample_directional_losses(proxy, ids, mask, dict(zip(names, z, strict=True)),
                                                             chunk=config.hypergrad_chunk)
                hypergrad = torch.autograd.grad(bilevel.surrogate_upper_loss(scores, c), score_params,
                                                allow_unused=True)
                hypergrad = [torch.zeros_like(p) if h is None else h
                             for h, p in zip(hypergrad, score_params, strict=True)]
    residual = bilevel.z_residual(hz, z, v, config.z_damping)
    hypergrad_norm = bilevel.norm(hypergrad)

    # 5. Upper AdamW step on the score model.
    with timed("upper_step"):
        lr_s = cosine_lr(step, config.steps, config.lr_scorer, config.lr_warmup_fraction, config.min_lr_ratio)
        set_lr(opt_scorer, lr_s)
        for p, h in zip(score_params, hypergrad, strict=True):
            p.grad = h.detach().to(p.dtype)
        clip_and_step(score_model, opt_scorer, config.grad_clip)
    return OuterStepFigures(loss_lower=lower, loss_upper=loss_upper.item(), hypergrad_norm=hypergrad_norm,
                            z_residual=residual, weight_entropy=bilevel.weight_entropy(weights), lr_scorer=lr_s,
                            lr_proxy=opt_proxy.param_groups[0]["lr"])


# ----------------------------------------------------------------------------------------------------
# The stage


def run_train_scorer(config: TrainScorerConfig, run_dir: RunDir,
                     on_event: Callable[[str, dict[str, Any]], None] | None = None) -> TrainScorerResult:
    """Train the score model into ``run_dir`` (see the module docstring); ``on_event(kind, figures)`` sees
    every event as it is written (the CLI's progress bar)."""
    device = resolve_device(config.device)
    train_shards = discover_shards(list(config.train))
    val_shards = discover_shards(config.val)
    run_dir.create()
    state_path = run_dir.checkpoints / STATE_FILE
    score_model_path = run_dir.checkpoints / SCORE_MODEL_FILE
    warmup_path = run_dir.checkpoints / WARMUP_FILE
    resuming = config.resume and state_path.exists()
    if state_path.exists() and not config.resume:
        raise UserError(f"run {run_dir.name!r} already has a train-scorer checkpoint; pass --resume to continue "
                        "it or choose another --run")
    state = torch.load(state_path, map_location="cpu", weights_only=False) if resuming else None
    if state is not None:
        _check_resumable(state["config"], config)

    # The KL term compares next-token distributions, so with a target the default tokenizer is the target's.
    target, target_tokenizer = load_target(config.target, device) if config.target else (None, None)
    spec = config.tokenizer
    if spec is None and target_tokenizer is not None and not run_dir.tokenizer_path.exists():
        spec = str(target_tokenizer)
    tokenizer = resolve_tokenizer(spec, run_dir.tokenizer_path, training_sample(train_shards), config.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    pad_id = tokenizer.token_to_id(PADDING)
    pad_id = end_of_text_id(tokenizer) if pad_id is None else pad_id
    encode = make_encoder(tokenizer, config.seq_len)
    run_dir.record_config("train-scorer", config, seed=config.seed)
    events = run_dir.events("train-scorer")
    warmup_step, step = 0, 0
    try:

        def emit(kind: str, **figures: Any) -> None:
            events.emit(kind, **figures)
            if on_event is not None:
                on_event(kind, figures)

        val_docs = tokenised_documents(val_shards, encode, limit=MAX_VAL_DOCS)
        if not val_docs:
            raise UserError(f"--val {config.val}: no document with 2 or more tokens")
        probe_docs = tokenised_documents(train_shards, encode, limit=config.probe_docs)

        # Models and optimisers. The proxy's fast attention kernels serve the inner steps; the z-solve and the
        # hypergradient switch to the MATH kernel (double backward).
        torch.manual_seed(config.seed)
        model_config = with_max_seq_len(model_preset(config.proxy), config.seq_len)
        lr_proxy = config.lr_proxy or model_config.lr
        proxy = build_causal_lm(model_config, vocab_size, seed=config.seed).to(device).train()
        if target is not None:
            check_target_vocab(target, vocab_size, config.target)
        gamma = config.gamma if target is not None else 0.0
        opt_proxy = make_adamw(proxy, config, lr_proxy)
        score_model: ScoreModel | None = None
        opt_scorer = None
        warmup_step, step, elapsed_before = 0, 0, 0.0
        val_rng = np.random.default_rng([config.seed, 1])
        data_position = None
        if state is not None:
            proxy.load_state_dict(state["proxy"])
            warmup_step, step, elapsed_before = state["warmup_step"], state["step"], state["elapsed_s"]
            if state["score_model"] is not None:
                score_model = ScoreModel.from_proxy(proxy)
                score_model.load_state_dict(state["score_model"])
                opt_proxy = make_adamw(proxy, config, lr_proxy)
                opt_scorer = make_adamw(score_model, config, config.lr_scorer)
                opt_scorer.load_state_dict(state["opt_scorer"])
            opt_proxy.load_state_dict(state["opt_proxy"])
            val_rng.bit_generator.state = state["val_rng"]
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            data_position = state["data"]
        stream = DocumentStream(train_shards, encode, seed=config.seed, buffer=config.shuffle_buffer,
                                position=data_position)

        def save_state(phase: str) -> None:
            payload = {
                "format": "blissctl.train-scorer-state/1",
                "phase": phase,
                "config": _resume_keys(config),
                "warmup_step": warmup_step,
                "step": step,
                "elapsed_s": elapsed_before + (time.perf_counter() - t_start),
                "proxy": proxy.state_dict(),
                "score_model": score_model.state_dict() if score_model is not None else None,
                "opt_proxy": opt_proxy.state_dict(),
                "opt_scorer": opt_scorer.state_dict() if opt_scorer is not None else None,
                "schedules": {"proxy": {"inner_step": step * config.inner_steps, "total": config.steps * config.inner_steps,
                                        "peak": lr_proxy},
                              "scorer": {"step": step, "total": config.steps, "peak": config.lr_scorer},
                              "warmup": {"step": warmup_step, "total": config.warmup_steps, "peak": lr_proxy}},
                "data": dict(stream.position),
                "val_rng": val_rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }
            atomic_write_with(state_path, lambda tmp: torch.save(payload, tmp))
            if score_model is not None:
                save_score_model(score_model_path, score_model, preset=config.proxy, vocab_size=vocab_size,
                                 seq_len=config.seq_len, pad_id=pad_id, extra={"outer_step": step})

        total_work = config.warmup_steps + config.steps
        t_start = time.perf_counter()
        emit("start", proxy=config.proxy, steps=config.steps, warmup_steps=config.warmup_steps, device=str(device),
             proxy_params=count_parameters(proxy), vocab_size=vocab_size, train_shards=len(train_shards),
             val_docs=len(val_docs), probe_docs=len(probe_docs), target=config.target, gamma=gamma,
             hypergrad=config.hypergrad, resumed_at_step=(step if resuming else None),
             resumed_at_warmup_step=(warmup_step if resuming else None))

        # ---- Phase 1: proxy warm-up on random training data (uniform weights) --------------------------
        while score_model is None and warmup_step < config.warmup_steps:
            set_lr(opt_proxy, cosine_lr(warmup_step, config.warmup_steps, lr_proxy, config.lr_warmup_fraction,
                                        config.min_lr_ratio))
            ids, mask = collate(stream.next_batch(config.batch_size), pad_id, device)
            with autocast(device):
                loss = bilevel.sequence_losses(bilevel.lm_logits(proxy, ids, mask), ids, mask).mean()
            loss.backward()
            clip_and_step(proxy, opt_proxy, config.grad_clip)
            warmup_step += 1
            if warmup_step % config.checkpoint_every == 0 and warmup_step < config.warmup_steps:
                save_state("warmup")
            emit("warmup", step=warmup_step, total_steps=config.warmup_steps, loss=round(loss.item(), 5))
            emit("progress", fraction=round(warmup_step / total_work, 5))

        if score_model is None:
            # Warm-up done: keep it (rounds reset the proxy to it), start the score model from its backbone, and
            # give the proxy a fresh optimiser and schedule for the bilevel phase.
            atomic_write_with(warmup_path, lambda tmp: torch.save(
                {"format": "blissctl.proxy/1", "preset": config.proxy, "vocab_size": vocab_size,
                 "seq_len": config.seq_len, "model": proxy.state_dict(), "warmup_steps": warmup_step}, tmp))
            score_model = ScoreModel.from_proxy(proxy).train()
            opt_proxy = make_adamw(proxy, config, lr_proxy)
            opt_scorer = make_adamw(score_model, config, config.lr_scorer)
            save_state("outer")
            edges, counts = score_histogram(score_documents(score_model, probe_docs, pad_id, device))
            emit("histogram", step=0, edges=edges, counts=counts, threshold=None)

        steps_this_run, t_outer = 0, time.perf_counter()

        # ---- Phase 2: outer steps ---------------------------------------------------------------------
        while step < config.steps:
            pick = val_rng.choice(len(val_docs), size=min(config.val_batch_size, len(val_docs)), replace=False)
            out = outer_step(
                proxy=proxy, score_model=score_model, target=target, opt_proxy=opt_proxy, opt_scorer=opt_scorer,
                train_batches=(collate(stream.next_batch(config.batch_size), pad_id, device)
                               for _ in range(config.inner_steps + 1)),
                val_batch=collate([val_docs[i] for i in pick], pad_id, device),
                config=config, gamma=gamma, step=step, lr_proxy=lr_proxy,
            )
            step += 1
            steps_this_run += 1

            last = step == config.steps
            if step % config.checkpoint_every == 0 or last:
                save_state("outer")
            emit("step", step=step, total_steps=config.steps, loss_lower=round(out.loss_lower, 5),
                 loss_upper=round(out.loss_upper, 5), hypergrad_norm=float(f"{out.hypergrad_norm:.5g}"),
                 z_residual=round(out.z_residual, 5), weight_entropy=round(out.weight_entropy, 5),
                 steps_per_s=round(steps_this_run / (time.perf_counter() - t_outer), 4), lr=out.lr_scorer,
                 lr_proxy=out.lr_proxy)
            emit("progress", fraction=round((config.warmup_steps + step) / total_work, 5))
            if step % config.histogram_every == 0 or last:
                edges, counts = score_histogram(score_documents(score_model, probe_docs, pad_id, device))
                emit("histogram", step=step, edges=edges, counts=counts, threshold=None)

        loss_val = validation_loss(proxy, val_docs[: config.val_docs], pad_id, device)
        if not score_model_path.exists():  # a resume of a finished run
            save_state("outer")
        elapsed = elapsed_before + (time.perf_counter() - t_start)
        skipped = stream.skips.as_dict()
        skipped["too_short"] = stream.too_short
        emit("done", steps=step, elapsed_s=round(elapsed, 2), loss_val=round(loss_val, 5),
             checkpoint=str(score_model_path), skipped=skipped)
        return TrainScorerResult(steps=step, elapsed_s=elapsed, loss_val=loss_val, score_model=score_model_path,
                                 warmup_checkpoint=warmup_path if warmup_path.exists() else None, skipped=skipped)
    except BaseException as error:  # the dashboard shows why a run stopped; --resume continues it
        events.emit("error", message=str(error) or type(error).__name__,
                    interrupted=isinstance(error, KeyboardInterrupt), step=step, warmup_step=warmup_step)
        raise
    finally:
        events.close()


RESUME_KEYS = ("proxy", "seq_len", "batch_size", "steps", "warmup_steps", "inner_steps", "seed", "tokenizer",
               "vocab_size", "hypergrad", "shuffle_buffer", "train", "val")


def _resume_keys(config: TrainScorerConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(config, k)) for k in RESUME_KEYS)}


def _check_resumable(saved: dict[str, Any], config: TrainScorerConfig) -> None:
    """A resume must not silently change what the checkpoint means."""
    now = _resume_keys(config)
    changed = [k for k in RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} ({saved.get(k)!r} → {now[k]!r})" for k in changed)
        raise UserError(f"cannot resume: changed since the checkpoint: {flags}")
