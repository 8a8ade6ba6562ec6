"""``train-scorer``: learn the BLISS score model by bilevel optimisation against a small proxy LM.

One flat loop (nanoGPT style) around a short set-up: ``build_training`` (tokenizer, documents, models,
optimisers), ``restore`` (a ``--resume`` puts everything back where the checkpoint left it), then

    warm-up:  plain LM steps of the proxy on random training documents, then save it
              (``checkpoints/proxy-warmup.pt``) and start the score model from its backbone;
    outer:    ``engine.bliss.outer_step`` (K inner steps, v, z-solve, hypergradient, upper step)
              until ``--steps``, checkpointing as it goes.

Everything needed to continue (both models, both optimisers, the loop's position, the data position and
the RNG states) is checkpointed atomically (``engine.bliss.artifacts``); ``resume=True`` continues from
there and gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.bliss import artifacts, bilevel
from engine.bliss.config import TrainScorerConfig, check_resumable, resume_keys
from engine.bliss.outer_step import clip_and_step, cosine_lr, make_adamw, outer_step, set_lr
from engine.bliss.score_model import ScoreModel
from engine.data.collate import collate
from engine.data.sources import discover_shards
from engine.data.stream import DocumentStream, tokenised_documents
from engine.data.tokenizer import padding_id, prefix_encoder, resolve_tokenizer, training_sample
from engine.errors import UserError
from engine.models.checkpoints import load_pretrained_model
from engine.models.families import build_causal_lm, count_parameters, padded_vocab_size
from engine.models.presets import model_preset, with_max_seq_len
from engine.models.torch_files import load_weights
from engine.run_dir import RunDir, StageSession
from engine.runtime import autocast, resolve_device

STAGE = "train-scorer"
HISTOGRAM_BINS = 50
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""A folder holding one of these beside config.json is a ``save_pretrained`` model (a run folder, which
has a config.json too, is not)."""
MAX_VAL_DOCS = 100_000
"""Validation documents held in memory (tokenised) to draw validation batches from."""


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
# Small pieces


def _rounded(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(value, digits)


def load_target(path: str, device: torch.device) -> tuple[torch.nn.Module, Path | None]:
    """The frozen target LM and its tokenizer: a pretrain checkpoint folder or run directory (latest
    checkpoint), or a ``save_pretrained`` folder. Eval mode, no gradient."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and any((p / name).exists() for name in HF_WEIGHTS):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True)
        except Exception as error:  # a folder transformers cannot read: a foreign or damaged model
            raise UserError(f"--target {path}: cannot load this model folder ({str(error).splitlines()[0]})") from None
        tokenizer_path = p / "tokenizer.json" if (p / "tokenizer.json").is_file() else None
    else:
        model, tokenizer_path = load_pretrained_model(p)
        tokenizer_path = Path(tokenizer_path) if tokenizer_path and Path(tokenizer_path).is_file() else None
    model.eval().requires_grad_(False)
    return model.to(device), tokenizer_path


def check_target_vocab(target: torch.nn.Module, vocab_size: int, path: str) -> None:
    if target.config.vocab_size != padded_vocab_size(vocab_size):
        raise UserError(
            f"--target {path}: its vocabulary ({target.config.vocab_size}) does not match this run's tokenizer "
            f"({padded_vocab_size(vocab_size)}); train the scorer with the target's tokenizer (--tokenizer)")


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


# ----------------------------------------------------------------------------------------------------
# Set-up: build, restore


@dataclass
class LoopState:
    """Where the loop is: saved with every checkpoint, put back by ``restore``."""

    warmup_step: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    """Training time before this launch (earlier launches of a resumed run)."""


@dataclass
class Training:
    """What the loop works on, built once by ``build_training``."""

    config: TrainScorerConfig
    device: torch.device
    vocab_size: int
    pad_id: int
    train_shards: list[Path]
    val_docs: list[np.ndarray]
    probe_docs: list[np.ndarray]
    proxy: torch.nn.Module
    opt_proxy: torch.optim.Optimizer
    lr_proxy: float
    target: torch.nn.Module | None
    gamma: float
    stream: DocumentStream
    val_rng: np.random.Generator
    score_model: ScoreModel | None = None
    """None until the warm-up ends (or a checkpoint of the bilevel phase is restored)."""
    opt_scorer: torch.optim.Optimizer | None = None
    z: list[torch.Tensor] | None = None
    """The last outer step's z, carried into the next z-solve with ``--z-carry``."""
    runs_dir: Path = Path("runs")
    """Where run names given to ``--score-init`` are looked up (the run's own parent)."""

    def start_score_model(self) -> None:
        """The warm-up is over: the score model starts from the proxy's backbone (or ``--score-init``'s
        score model), and the proxy gets a fresh AdamW (its warm-up moments are forgotten) and schedule
        for the bilevel phase."""
        self.score_model = ScoreModel.from_proxy(self.proxy).train()
        if self.config.score_init:
            found = artifacts.find_score_model(self.config.score_init, self.runs_dir, flag="--score-init")
            state = artifacts.load_score_init(found, preset=self.config.proxy, vocab_size=self.vocab_size)
            load_weights(self.score_model, state, path=Path(self.config.score_init), what="--score-init score model")
        self.opt_proxy.state.clear()
        self.opt_scorer = make_adamw(self.score_model, self.config, self.config.lr_scorer)

    def batch(self):
        return collate(self.stream.next_batch(self.config.batch_size), self.pad_id, self.device)


def proxy_tokenizer(proxy_init: artifacts.ProxyInit, wanted: str | None) -> str:
    """The tokenizer of a ``--proxy-init`` model is the run's; one line if ``--tokenizer`` names another."""
    from engine.data.tokenizer import load_tokenizer

    if wanted is not None and load_tokenizer(wanted).to_str() != load_tokenizer(proxy_init.tokenizer).to_str():
        raise UserError(f"--tokenizer {wanted} is not the tokenizer the --proxy-init model was trained with "
                        f"({proxy_init.tokenizer})")
    return str(proxy_init.tokenizer)


def saved_state(config: TrainScorerConfig, run_dir: RunDir) -> dict[str, Any] | None:
    """The run's checkpoint when resuming (``None`` for a fresh run); refuses a second fresh start."""
    path = artifacts.trainer_state_path(run_dir)
    if path.exists() and not config.resume:
        raise UserError(f"run {run_dir.name!r} already has a train-scorer checkpoint; pass --resume to continue "
                        "it or choose another --run")
    if not (config.resume and path.exists()):
        return None
    state = artifacts.load_trainer_state(path)
    check_resumable(state["config"], config)
    return state


def build_training(config: TrainScorerConfig, run_dir: RunDir, device: torch.device,
                   state: dict[str, Any] | None) -> Training:
    """Tokenizer (saved in the run), validation and probe documents, proxy, target and the proxy's
    optimiser, with the data stream at the checkpoint's position when there is one."""
    train_shards = discover_shards(list(config.train))
    val_shards = discover_shards(config.val)
    # The KL term compares next-token distributions, so with a target the default tokenizer is the target's.
    target, target_tokenizer = load_target(config.target, device) if config.target else (None, None)
    proxy_init = artifacts.find_proxy_init(config.proxy_init, run_dir.root.parent) if config.proxy_init else None
    if config.score_init:  # a wrong name fails now, not after the warm-up
        artifacts.find_score_model(config.score_init, run_dir.root.parent, flag="--score-init")
    spec = config.tokenizer
    if proxy_init is not None:
        spec = proxy_tokenizer(proxy_init, spec)
    elif spec is None and target_tokenizer is not None and not run_dir.tokenizer_path.exists():
        spec = str(target_tokenizer)
    tokenizer = resolve_tokenizer(spec, run_dir.tokenizer_path, training_sample(train_shards), config.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    pad_id = padding_id(tokenizer)
    encode = prefix_encoder(tokenizer, config.seq_len)
    run_dir.record_config(STAGE, config, seed=config.seed)

    val_docs = tokenised_documents(val_shards, encode, limit=MAX_VAL_DOCS)
    if not val_docs:
        raise UserError(f"--val {config.val}: no document with 2 or more tokens")
    probe_docs = tokenised_documents(train_shards, encode, limit=config.probe_docs)

    # The proxy's fast attention kernels serve the inner steps; the z-solve and the hypergradient switch
    # to the MATH kernel (double backward).
    torch.manual_seed(config.seed)
    model_config = with_max_seq_len(model_preset(config.proxy), config.seq_len)
    lr_proxy = config.lr_proxy or model_config.lr
    proxy = build_causal_lm(model_config, vocab_size, seed=config.seed)
    if proxy_init is not None:
        if proxy_init.preset != config.proxy:
            raise UserError(f"--proxy {config.proxy} differs from the --proxy-init model ({proxy_init.preset}); "
                            "drop --proxy")
        load_weights(proxy, proxy_init.weights(), path=proxy_init.path, what="--proxy-init model")
    proxy = proxy.to(device).train()
    if target is not None:
        check_target_vocab(target, vocab_size, config.target)
    stream = DocumentStream(train_shards, encode, seed=config.seed, buffer=config.shuffle_buffer,
                            position=state["data"] if state is not None else None)
    return Training(
        config=config, device=device, vocab_size=vocab_size, pad_id=pad_id, train_shards=train_shards,
        val_docs=val_docs, probe_docs=probe_docs, proxy=proxy, opt_proxy=make_adamw(proxy, config, lr_proxy),
        lr_proxy=lr_proxy, target=target, gamma=config.gamma if target is not None else 0.0, stream=stream,
        val_rng=np.random.default_rng([config.seed, 1]), runs_dir=run_dir.root.parent,
    )


def restore(training: Training, state: dict[str, Any]) -> LoopState:
    """Models, optimisers and RNG states as the checkpoint has them; the loop's position."""
    training.proxy.load_state_dict(state["proxy"])
    if state["score_model"] is not None:  # saved in the bilevel phase
        training.score_model = ScoreModel.from_proxy(training.proxy)
        training.score_model.load_state_dict(state["score_model"])
        training.opt_scorer = make_adamw(training.score_model, training.config, training.config.lr_scorer)
        training.opt_scorer.load_state_dict(state["opt_scorer"])
    training.opt_proxy.load_state_dict(state["opt_proxy"])
    training.val_rng.bit_generator.state = state["val_rng"]
    if state.get("z") is not None:
        training.z = [t.to(training.device) for t in state["z"]]
    torch.set_rng_state(state["torch_rng"])  # last: building the score model above drew from it
    if training.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], training.device)
    return LoopState(warmup_step=state["warmup_step"], step=state["step"], elapsed_s=state["elapsed_s"])


def save_checkpoint(training: Training, loop: LoopState, run_dir: RunDir, elapsed_s: float) -> None:
    """The resume state, and the score model ``select`` loads once there is one."""
    artifacts.save_trainer_state(artifacts.trainer_state_path(run_dir), {
        "config": resume_keys(training.config),
        "warmup_step": loop.warmup_step,
        "step": loop.step,
        "elapsed_s": elapsed_s,
        "proxy": training.proxy.state_dict(),
        "score_model": training.score_model.state_dict() if training.score_model is not None else None,
        "opt_proxy": training.opt_proxy.state_dict(),
        "opt_scorer": training.opt_scorer.state_dict() if training.opt_scorer is not None else None,
        "data": dict(training.stream.position),
        "val_rng": training.val_rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(training.device) if training.device.type == "cuda" else None,
        "z": [t.cpu() for t in training.z] if training.z is not None else None,
    })
    if training.score_model is not None:
        artifacts.save_score_model(
            artifacts.score_model_path(run_dir), training.score_model, preset=training.config.proxy,
            vocab_size=training.vocab_size, seq_len=training.config.seq_len, pad_id=training.pad_id,
            extra={"outer_step": loop.step})


# ----------------------------------------------------------------------------------------------------
# The stage


def run_train_scorer(config: TrainScorerConfig, run_dir: RunDir,
                     on_event: Callable[[str, dict[str, Any]], None] | None = None) -> TrainScorerResult:
    """Train the score model into ``run_dir`` (see the module docstring); ``on_event(kind, figures)`` sees
    every event as it is written (the CLI's progress bar)."""
    device = resolve_device(config.device)
    if config.threads is not None:  # the CLI decides (engine.runtime.plan_threads); a library caller may have
        torch.set_num_threads(config.threads)
    with run_dir.stage(STAGE, tensorboard=config.tensorboard) as session:
        state = saved_state(config, run_dir)
        training = build_training(config, run_dir, device, state)
        loop = restore(training, state) if state is not None else LoopState()
        try:
            return _train(training, loop, run_dir, session, on_event, resumed=state is not None)
        except BaseException:
            session.figures.update(step=loop.step, warmup_step=loop.warmup_step)  # in the error event
            raise


def _train(training: Training, loop: LoopState, run_dir: RunDir, session: StageSession, on_event,
           *, resumed: bool) -> TrainScorerResult:
    config, device = training.config, training.device

    def emit(kind: str, **figures: Any) -> None:
        session.emit(kind, **figures)
        if on_event is not None:
            on_event(kind, figures)

    total_work = config.warmup_steps + config.steps
    t_start = time.perf_counter()

    def checkpoint() -> None:
        save_checkpoint(training, loop, run_dir, loop.elapsed_s + time.perf_counter() - t_start)

    def histogram(step: int) -> None:
        edges, counts = score_histogram(score_documents(training.score_model, training.probe_docs,
                                                        training.pad_id, device))
        emit("histogram", step=step, edges=edges, counts=counts, threshold=None)

    emit("start", threads=torch.get_num_threads(), proxy=config.proxy, steps=config.steps, warmup_steps=config.warmup_steps, device=str(device),
         proxy_params=count_parameters(training.proxy), vocab_size=training.vocab_size,
         train_shards=len(training.train_shards), val_docs=len(training.val_docs),
         probe_docs=len(training.probe_docs), target=config.target, gamma=training.gamma, hypergrad=config.hypergrad,
         resumed_at_step=(loop.step if resumed else None),
         resumed_at_warmup_step=(loop.warmup_step if resumed else None))

    # ---- Phase 1: proxy warm-up on random training data (uniform weights) ------------------------------
    while training.score_model is None and loop.warmup_step < config.warmup_steps:
        set_lr(training.opt_proxy, cosine_lr(loop.warmup_step, config.warmup_steps, training.lr_proxy,
                                             config.lr_warmup_fraction, config.min_lr_ratio))
        ids, mask = training.batch()
        with autocast(device):
            loss = bilevel.sequence_losses(bilevel.lm_logits(training.proxy, ids, mask), ids, mask).mean()
        loss.backward()
        clip_and_step(training.proxy, training.opt_proxy, config.grad_clip)
        loop.warmup_step += 1
        if loop.warmup_step % config.checkpoint_every == 0 and loop.warmup_step < config.warmup_steps:
            checkpoint()
        emit("warmup", step=loop.warmup_step, total_steps=config.warmup_steps, loss=round(loss.item(), 5))
        emit("progress", fraction=round(loop.warmup_step / total_work, 5))

    if training.score_model is None:
        # Warm-up done: keep it (the perplexity scorer uses it; rounds reset the proxy to it).
        artifacts.save_proxy_warmup(artifacts.proxy_warmup_path(run_dir), training.proxy, preset=config.proxy,
                                    vocab_size=training.vocab_size, seq_len=config.seq_len,
                                    warmup_steps=loop.warmup_step)
        training.start_score_model()
        checkpoint()
        histogram(0)

    # ---- Phase 2: outer steps ------------------------------------------------------------------------
    steps_this_run, t_outer = 0, time.perf_counter()
    while loop.step < config.steps:
        pick = training.val_rng.choice(len(training.val_docs), size=min(config.val_batch_size, len(training.val_docs)),
                                       replace=False)
        out = outer_step(
            proxy=training.proxy, score_model=training.score_model, target=training.target,
            opt_proxy=training.opt_proxy, opt_scorer=training.opt_scorer,
            train_batches=(training.batch() for _ in range(config.inner_steps + 1)),
            val_batch=collate([training.val_docs[i] for i in pick], training.pad_id, device),
            config=config, gamma=training.gamma, step=loop.step, lr_proxy=training.lr_proxy,
            z_start=training.z if config.z_carry else None,
        )
        training.z = out.z if config.z_carry else None
        loop.step += 1
        steps_this_run += 1
        last = loop.step == config.steps
        if loop.step % config.checkpoint_every == 0 or last:
            checkpoint()
        emit("step", step=loop.step, total_steps=config.steps, loss_lower=round(out.loss_lower, 5),
             loss_upper=round(out.loss_upper, 5), hypergrad_norm=float(f"{out.hypergrad_norm:.5g}"),
             z_residual=_rounded(out.z_residual), z_cos_v=_rounded(out.z_cos_v, 6),
             z_curvature=_rounded(out.z_curvature), weight_entropy=round(out.weight_entropy, 5),
             steps_per_s=round(steps_this_run / (time.perf_counter() - t_outer), 4), lr=out.lr_scorer,
             lr_proxy=out.lr_proxy)
        emit("progress", fraction=round((config.warmup_steps + loop.step) / total_work, 5))
        if loop.step % config.histogram_every == 0 or last:
            histogram(loop.step)

    loss_val = validation_loss(training.proxy, training.val_docs[: config.val_docs], training.pad_id, device)
    score_model_path = artifacts.score_model_path(run_dir)
    if not score_model_path.exists():  # a resume of a finished run
        checkpoint()
    elapsed = loop.elapsed_s + (time.perf_counter() - t_start)
    skipped = training.stream.skips.as_dict()
    skipped["too_short"] = training.stream.too_short
    emit("done", steps=loop.step, elapsed_s=round(elapsed, 2), loss_val=round(loss_val, 5),
         checkpoint=str(score_model_path), skipped=skipped)
    warmup_path = artifacts.proxy_warmup_path(run_dir)
    return TrainScorerResult(steps=loop.step, elapsed_s=elapsed, loss_val=loss_val, score_model=score_model_path,
                             warmup_checkpoint=warmup_path if warmup_path.exists() else None, skipped=skipped)
