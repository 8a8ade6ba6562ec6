"""Pretraining a Pythia-family (or LLaMA-0.5B) model from scratch on packed tokens.

``train(config)`` is what every rank runs under ``torchrun`` (``engine.pretrain.worker``); it also runs
in-process (one rank, no process group) for tests. A short set-up, ``build_training`` (data, model,
parallelism, optimiser) and ``restore`` (a ``--resume`` puts everything back), around one flat loop,
nanoGPT style:

    while True:
        evaluate / checkpoint when due;  stop after the last step
        for each micro-batch: forward, loss / accum, backward   (gradient sync on the last only)
        clip, learning rate of this step, AdamW step; log

Parallelism: DDP by default, FSDP2 with ``fsdp=True`` (``engine.pretrain.parallel``). On CUDA: NCCL,
bf16, TF32 matmuls; on CPU: gloo and float32. Attention is PyTorch SDPA. The learning rate of step ``s``
is a pure function of ``s`` (``engine.pretrain.schedule``), so nothing about the schedule needs saving,
and a resume with a new ``--steps`` follows the new schedule from where it stands.

Data order is a seeded permutation of sequence indices per epoch (``engine.pretrain.order``), so a
resumed run, or one on a different number of ranks, reads exactly the same sequences at the same steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from engine.data.packing import PackedData, open_packed
from engine.errors import UserError
from engine.eval.evaluate import summed_nll
from engine.models import checkpoints as ckpts
from engine.models.families import build_causal_lm, count_parameters
from engine.pretrain.config import PretrainConfig
from engine.pretrain.order import SequenceOrder, micro_batch_start
from engine.pretrain.parallel import ParallelModel, full_state_dict_options, parallelise, transformer_blocks
from engine.pretrain.schedule import Schedule, decay_branch_multiplier
from engine.pretrain.throughput import flops_per_token, model_flops_utilisation, peak_flops
from engine.run_dir import TRAINER_LOCK_FILE, RunDir, StageSession, config_to_dict
from engine.runtime import Runtime, adamw_param_groups, all_gather, barrier, start_runtime

STAGE = "pretrain"
TRAINER_LOCK_WAIT_S = 30.0
"""How long a trainer waits for the run's previous trainer to finish dying (its launcher was killed and
the kernel is taking it down) before it gives up with one line."""


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    losses: dict[int, float]
    """Training loss of each logged step."""
    loss_val: float | None
    elapsed_s: float
    checkpoint: Path | None


@dataclass
class LoopState:
    """Where the loop is: saved with every checkpoint, put back by ``restore``."""

    step: int = 0
    tokens_seen: int = 0
    """Tokens this run has trained on."""
    elapsed_s: float = 0.0
    """Training time before this launch."""
    tokens_before: int = 0
    """Tokens the ``--init-from`` model had trained on before this run: curves of a model continued over
    several runs (BLISS's rounds) join up against the tokens it has seen in all."""

    @property
    def model_tokens(self) -> int:
        return self.tokens_before + self.tokens_seen


@dataclass
class Training:
    """What the loop works on, built once by ``build_training``."""

    config: PretrainConfig
    runtime: Runtime
    run: RunDir
    train_data: PackedData
    val_data: PackedData | None
    model: ParallelModel
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    order: SequenceOrder
    vocab_size: int
    n_params: int
    flops_token: float

    def set_learning_rate(self, step: int) -> float:
        """The schedule's rate for optimiser step ``step`` (0-based), set on every parameter group; steps
        past the last one are the ``--decay-steps`` branch's."""
        config = self.config
        if step < config.steps:
            lr = config.lr * self.schedule(step)
        else:
            lr = config.lr * decay_branch_multiplier(step - config.steps, decay_steps=config.decay_steps,
                                                     start=self.schedule(config.steps - 1),
                                                     min_ratio=config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def batch(self, step: int, micro: int):
        """Inputs and targets (B, T) of micro-batch ``micro`` of this rank at ``step``."""
        config, rt = self.config, self.runtime
        start = micro_batch_start(step, micro, rank=rt.rank, world_size=rt.world_size,
                                  micro_batch=config.micro_batch, batch_sequences=config.batch_sequences)
        idx = self.order.indices(start, config.micro_batch)
        rows = np.stack([self.train_data.sequence(int(i), config.seq_len) for i in idx]).astype(np.int64)
        xy = torch.from_numpy(rows)  # (B, T+1)
        if rt.cuda:
            xy = xy.pin_memory().to(rt.torch_device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]  # inputs (B, T), targets (B, T)

    def validation_loss(self) -> float | None:
        if self.val_data is None:
            return None
        nll, count = summed_nll(
            self.model.evaluate, self.val_data.tokens, seq_len=self.config.seq_len,
            batch_size=self.config.micro_batch, device=self.runtime.torch_device,
            autocast_dtype=self.model.autocast_dtype, rank=self.runtime.rank, world_size=self.runtime.world_size,
            max_tokens=self.config.eval_tokens, pad_id=int(self.val_data.header["eot_id"]),
        )
        return nll / max(count, 1)


def build_training(config: PretrainConfig, rt: Runtime, run: RunDir) -> Training:
    """Packed data, the model (compiled, sharded or wrapped as configured), AdamW and the schedule."""
    data_dir = run.root / "data"
    train_data = open_packed(data_dir, "train")
    val_data = open_packed(data_dir, "val") if (data_dir / "val.json").exists() and config.val else None
    if config.steps is None:
        raise UserError("the config has no resolved --steps (prepare the run with blissctl pretrain)")
    if rt.world_size != config.world_size:
        raise UserError(f"config is for {config.world_size} processes but torchrun started {rt.world_size}")
    vocab_size = int(train_data.header["vocab_size"])
    model = build_causal_lm(config.model, vocab_size, seed=config.seed)
    n_params = count_parameters(model)
    flops_token = flops_per_token(config.model, count_parameters(model, exclude_embeddings=True), config.seq_len)
    if config.compile:
        for block in transformer_blocks(model):
            block.compile()
    parallel = parallelise(model, fsdp=config.fsdp, runtime=rt)
    optimizer = torch.optim.AdamW(
        adamw_param_groups(parallel.module, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2),
        eps=1e-8, fused=rt.cuda,
    )
    return Training(
        config=config, runtime=rt, run=run, train_data=train_data, val_data=val_data, model=parallel,
        optimizer=optimizer, schedule=Schedule(config.steps, config.warmup_frac, config.min_lr_ratio, config.lr_schedule),
        order=SequenceOrder(train_data.n_sequences(config.seq_len), config.seed), vocab_size=vocab_size,
        n_params=n_params, flops_token=flops_token,
    )


def restore(training: Training, checkpoint: Path) -> LoopState:
    """Weights, optimiser state and this rank's RNG states from ``checkpoint``; the loop's position."""
    state = ckpts.read_trainer_state(checkpoint)
    model_state, optim_state, rng_states = ckpts.load_training_states(checkpoint)
    options = full_state_dict_options()
    module = training.model.module
    try:
        set_model_state_dict(module, model_state, options=options)
        set_optimizer_state_dict(module, training.optimizer, optim_state, options=options)
    except (RuntimeError, KeyError, ValueError) as error:
        raise UserError(f"{checkpoint}: its weights or optimiser state do not fit this run's model "
                        f"({str(error).splitlines()[0]})") from None
    if training.runtime.rank < len(rng_states):
        ckpts.restore_rng_state(rng_states[training.runtime.rank])
    return LoopState(step=state["step"], tokens_seen=state["tokens_seen"], elapsed_s=state["elapsed_s"],
                     tokens_before=int(state.get("tokens_before", 0)))


def start_from(training: Training, checkpoint: Path) -> LoopState:
    """``--init-from``: the weights of another run's checkpoint, and its AdamW state unless
    ``--reset-optimizer``; this run's own schedule, data order and RNG start afresh at step 0."""
    meta = ckpts.read_meta(checkpoint)
    model_state, optim_state, _ = ckpts.load_training_states(checkpoint)
    if int(meta["vocab_size"]) != training.vocab_size:
        raise UserError(f"--init-from {checkpoint}: its vocabulary ({meta['vocab_size']}) is not this run's "
                        f"({training.vocab_size})")
    options = full_state_dict_options()
    module = training.model.module
    try:
        set_model_state_dict(module, model_state, options=options)
        if not training.config.reset_optimizer:
            set_optimizer_state_dict(module, training.optimizer, optim_state, options=options)
    except (RuntimeError, KeyError, ValueError) as error:
        raise UserError(f"--init-from {checkpoint}: its weights or optimiser state do not fit this run's model "
                        f"({str(error).splitlines()[0]})") from None
    return LoopState(tokens_before=int(meta.get("tokens_seen", 0)))


def save_checkpoint(training: Training, loop: LoopState, elapsed_s: float, *, folder: Path | None = None,
                    keep: int | None = None) -> Path | None:
    """A full (unsharded) checkpoint written by rank 0 into ``folder`` (the run's ``checkpoints/``);
    every rank takes part in gathering it."""
    config, rt = training.config, training.runtime
    options = full_state_dict_options(cpu_offload=True)
    model_state = get_model_state_dict(training.model.module, options=options)
    optim_state = get_optimizer_state_dict(training.model.module, training.optimizer, options=options)
    rng_states = all_gather(rt, ckpts.capture_rng_state())
    path = None
    if rt.is_main:
        path = ckpts.write_checkpoint(
            folder or training.run.checkpoints, loop.step, model_state=model_state, optimizer_state=optim_state,
            trainer_state={
                "step": loop.step, "tokens_seen": loop.tokens_seen, "tokens_before": loop.tokens_before,
                "sequences_seen": loop.step * config.batch_sequences, "elapsed_s": elapsed_s,
                "world_size": rt.world_size,
            },
            rng_states=rng_states,
            meta={"model": config_to_dict(config.model), "vocab_size": training.vocab_size,
                  "seq_len": config.seq_len, "size": config.size, "tokens_seen": loop.model_tokens},
            tokenizer_path=training.run.tokenizer_path, keep=keep or config.keep,
        )
    barrier(rt)
    return path


def train(config: PretrainConfig, *, resume: bool = False, stop_after: int | None = None,
          runtime: Runtime | None = None, quiet: bool = False) -> TrainResult:
    """Run (or continue, with ``resume``) the pretraining described by ``config`` on this rank.

    ``stop_after`` ends this invocation after that many steps (with a checkpoint), as a time-limited
    job would; ``--resume`` continues it on the same schedule. Rank 0 holds the run's trainer lock for
    the whole loop, so two trainers never write one run.
    """
    rt = runtime or start_runtime(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    run = RunDir(Path(config.run_dir))
    with run.stage(STAGE, main=rt.is_main, lock_name=TRAINER_LOCK_FILE, wait_s=TRAINER_LOCK_WAIT_S,
                   tensorboard=config.tensorboard) as session:
        training = build_training(config, rt, run)
        latest = ckpts.latest_checkpoint(run.checkpoints)
        if latest is not None and not resume:
            raise UserError(f"{run.root} already has checkpoints; pass --resume to continue it")
        if resume and latest is not None:
            loop = restore(training, latest)
            resumed_from = latest.name
        else:
            torch.manual_seed(config.seed + rt.rank)
            np.random.seed(config.seed + rt.rank)
            loop = start_from(training, Path(config.init_from)) if config.init_from else LoopState()
            resumed_from = None
        try:
            return _loop(training, loop, session, stop_after=stop_after, resumed_from=resumed_from, quiet=quiet)
        except BaseException:
            session.figures.update(step=loop.step)
            raise


def optimiser_step(training: Training, loop: LoopState) -> tuple[torch.Tensor, float]:
    """One optimiser step over ``grad_accum`` micro-batches at ``loop.step``, which it advances; the
    summed micro-batch losses (on the device, not synchronised) and the learning rate used."""
    config, model = training.config, training.model
    accum = config.grad_accum
    loss_sum = torch.zeros((), device=training.runtime.torch_device)
    for micro in range(accum):
        inputs, targets = training.batch(loop.step, micro)
        with model.gradient_sync(micro == accum - 1), model.autocast():
            logits = model.train(input_ids=inputs, use_cache=False).logits  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        # Mean over micro-batches: each backward carries 1/accum of its gradient.
        (loss / accum).backward()
        loss_sum += loss.detach()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.module.parameters(), config.grad_clip)
    lr = training.set_learning_rate(loop.step)
    training.optimizer.step()
    training.optimizer.zero_grad(set_to_none=True)
    loop.step += 1
    loop.tokens_seen += config.global_batch_tokens
    return loss_sum, lr


def decay_branch(training: Training, loop: LoopState, session: StageSession, say) -> float | None:
    """``--decay-steps``: from the main line's last state (already checkpointed), that many more steps at
    a linearly falling rate, on the sequences the main line would have read next; evaluated, and saved
    as ``runs/<name>/decayed/``. The main line's checkpoints are not touched. Returns the branch's
    validation loss (None without ``--val``, or when a resume finds the branch already written)."""
    config = training.config
    folder = training.run.decayed / "checkpoints"
    final_step = config.steps + config.decay_steps
    written = ckpts.latest_checkpoint(folder)
    if written is not None and ckpts.read_trainer_state(written).get("step") == final_step:
        return None
    branch = LoopState(step=loop.step, tokens_seen=loop.tokens_seen, elapsed_s=loop.elapsed_s,
                       tokens_before=loop.tokens_before)
    say(f"decay branch: {config.decay_steps} steps from step {loop.step} into {training.run.decayed}")
    t0 = time.perf_counter()
    training.model.train.train()
    while branch.step < final_step:
        optimiser_step(training, branch)
    loss_val = training.validation_loss()
    if loss_val is not None:
        session.emit("eval", step=branch.step, loss_val=loss_val, tokens_seen=branch.model_tokens, branch="decay")
        say(f"decay branch, step {branch.step}: val loss {loss_val:.4f}")
    path = save_checkpoint(training, branch, branch.elapsed_s + time.perf_counter() - t0, folder=folder, keep=1)
    if path is not None:
        session.emit("checkpoint", step=branch.step, path=str(path), branch="decay")
    return loss_val


def _loop(training: Training, loop: LoopState, session: StageSession, *, stop_after: int | None,
          resumed_from: str | None, quiet: bool) -> TrainResult:
    config, rt, model = training.config, training.runtime, training.model
    say = (lambda *a: print(*a, flush=True)) if rt.is_main and not quiet else (lambda *a: None)
    total_steps, accum = config.steps, config.grad_accum
    start_step = loop.step
    stop_at = total_steps if stop_after is None else min(total_steps, loop.step + stop_after)
    peak = peak_flops(torch.cuda.get_device_name(rt.torch_device)) if rt.cuda else None
    if resumed_from is not None:
        say(f"resumed from {training.run.checkpoints / resumed_from} at step {loop.step}")
    session.emit(
        "start", size=config.size, params=training.n_params, world_size=rt.world_size, steps=total_steps,
        start_step=loop.step, resumed_from=resumed_from, seq_len=config.seq_len,
        global_batch_tokens=config.global_batch_tokens, micro_batch=config.micro_batch, grad_accum=accum,
        fsdp=config.fsdp, device=rt.torch_device.type, train_tokens=training.train_data.n_tokens,
        threads=torch.get_num_threads(), lr_schedule=config.lr_schedule, decay_steps=config.decay_steps,
        init_from=config.init_from, tokens_before=loop.tokens_before,
    )
    say(f"pretrain {config.size}: {training.n_params / 1e6:.1f}M params, {rt.world_size} process(es) on "
        f"{rt.torch_device.type}, {'FSDP' if config.fsdp else 'DDP'}, steps {loop.step}→{total_steps}, "
        f"{config.global_batch_tokens:,} tokens/step ({accum} micro-batch(es) of {config.micro_batch} per rank)")

    losses: dict[int, float] = {}
    loss_val = None
    last_checkpoint = None
    model.train.train()
    t0 = time.perf_counter()
    t_log, tokens_at_log = t0, loop.tokens_seen
    while True:
        last_step = loop.step == stop_at
        if training.val_data is not None and loop.step > start_step and (
                loop.step % config.eval_every == 0 or loop.step == total_steps):
            loss_val = training.validation_loss()
            session.emit("eval", step=loop.step, loss_val=loss_val, tokens_seen=loop.model_tokens)
            say(f"step {loop.step}: val loss {loss_val:.4f}")
            t_log = time.perf_counter()  # evaluation time is not training throughput
        if loop.step > start_step and (loop.step % config.save_every == 0 or last_step):
            last_checkpoint = save_checkpoint(training, loop, loop.elapsed_s + time.perf_counter() - t0)
            if last_checkpoint is not None:
                session.emit("checkpoint", step=loop.step, path=str(last_checkpoint))
            t_log = time.perf_counter()
        if last_step:
            break

        loss_sum, lr = optimiser_step(training, loop)

        if loop.step % config.log_every == 0 or loop.step == stop_at:
            loss_mean = loss_sum / accum
            if rt.in_group:
                dist.all_reduce(loss_mean, op=dist.ReduceOp.AVG)
            loss_value = float(loss_mean)  # synchronises with the device: the timing below is honest
            now = time.perf_counter()
            tokens_per_s = (loop.tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
            t_log, tokens_at_log = now, loop.tokens_seen
            losses[loop.step] = loss_value
            figures = {"step": loop.step, "total_steps": total_steps, "loss": loss_value, "lr": lr,
                       "tokens_per_s": round(tokens_per_s, 1), "tokens_seen": loop.model_tokens}
            if peak is not None:
                figures["mfu"] = round(model_flops_utilisation(tokens_per_s, training.flops_token, peak,
                                                               rt.world_size), 4)
            session.emit("step", **figures)
            mfu_text = f" | mfu {figures['mfu']:.1%}" if "mfu" in figures else ""
            say(f"step {loop.step}/{total_steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s{mfu_text}")

    elapsed = loop.elapsed_s + time.perf_counter() - t0
    if loop.step == total_steps:
        # Before ``done``: a run killed in its decay branch is not finished, and --resume redoes the branch.
        decayed = decay_branch(training, loop, session, say) if config.decay_steps else None
        session.emit("done", steps=loop.step, tokens_seen=loop.tokens_seen, model_tokens=loop.model_tokens,
                     elapsed_s=round(elapsed, 3), loss_val=loss_val,
                     **({"decayed_loss_val": decayed} if decayed is not None else {}))
        say(f"done: {loop.step} steps, {loop.tokens_seen:,} tokens in {elapsed:.1f}s"
            + (f", val loss {loss_val:.4f}" if loss_val is not None else ""))
    else:
        session.emit("stopped", step=loop.step, tokens_seen=loop.tokens_seen, elapsed_s=round(elapsed, 3))
        say(f"stopped after step {loop.step} of {total_steps}; continue with --resume")
    return TrainResult(steps=loop.step, tokens_seen=loop.tokens_seen, losses=losses, loss_val=loss_val,
                       elapsed_s=elapsed, checkpoint=last_checkpoint)
