"""Validation loss, perplexity and bits per byte of a causal LM over a packed token stream.

Every token of the stream but the first is predicted exactly once: the stream is cut into windows of
``seq_len + 1`` tokens that overlap by one (``tokens[i*T : i*T + T + 1]``), the last one shorter.
Bits per byte divide the total negative log-likelihood (nats) by ``ln 2 × UTF-8 bytes`` of the
validation text, so models with different tokenizers can be compared on the same text.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    loss: float
    """Mean next-token cross-entropy in nats."""
    perplexity: float
    bits_per_byte: float | None
    """``None`` when the byte count of the text is unknown (e.g. a capped in-training evaluation)."""
    tokens: int
    """Tokens predicted."""
    bytes: int | None


def eval_windows(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """``(start, inputs)`` of each window; together they predict tokens 1 … n_tokens-1 once each."""
    return [(start, min(seq_len, n_tokens - 1 - start)) for start in range(0, n_tokens - 1, seq_len)]


def window_batch(tokens: np.ndarray, windows: list[tuple[int, int]], seq_len: int, pad_id: int):
    """Inputs and targets (B, T) as int64 tensors; padding positions have target ``IGNORE_INDEX``."""
    import torch

    x = np.full((len(windows), seq_len), pad_id, dtype=np.int64)
    y = np.full((len(windows), seq_len), IGNORE_INDEX, dtype=np.int64)
    for row, (start, length) in enumerate(windows):
        chunk = np.asarray(tokens[start : start + length + 1], dtype=np.int64)
        x[row, :length] = chunk[:-1]
        y[row, :length] = chunk[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


def summed_nll(
    model,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    device,
    autocast_dtype=None,
    rank: int = 0,
    world_size: int = 1,
    max_tokens: int | None = None,
    pad_id: int = 0,
) -> tuple[float, int]:
    """Total NLL (nats) and number of predicted tokens over ``tokens``, summed across ranks.

    Batches are dealt round-robin to ranks; every rank runs the same number of forward passes (a rank
    without a batch of its own re-runs one with zero weight) because a sharded (FSDP) model gathers its
    weights collectively in each forward.
    """
    import torch
    import torch.nn.functional as F

    n_tokens = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    windows = eval_windows(n_tokens, seq_len)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    rounds = math.ceil(len(batches) / world_size)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for r in range(rounds):
            index = r * world_size + rank
            weight = 1.0 if index < len(batches) else 0.0
            x, y = window_batch(tokens, batches[min(index, len(batches) - 1)], seq_len, pad_id)
            x, y = x.to(device), y.to(device)
            with amp:
                logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
            loss_sum = F.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            nll += weight * loss_sum.double()
            count += weight * (y != IGNORE_INDEX).sum().double()
    model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        both = torch.stack([nll, count])
        dist.all_reduce(both)
        nll, count = both[0], both[1]
    return float(nll), int(count)


def eval_result(nll: float, count: int, n_bytes: int | None) -> EvalResult:
    loss = nll / max(count, 1)
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=nll / (math.log(2) * n_bytes) if n_bytes else None,
        tokens=count,
        bytes=n_bytes,
    )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What ``blissctl eval`` measures; the CLI builds it from flags."""

    checkpoint: str
    """``--checkpoint``: a ``checkpoints/step_NNNNNN`` folder, or a pretrain run directory (its latest)."""
    val: str | None = None
    """``--val``: held-out documents; default: the ``--val`` the run was pretrained with (none with
    ``--tasks`` alone)."""
    seq_len: int | None = None
    """``--seq-len``: tokens per window; default: the training length."""
    batch_size: int = 8
    """``--batch``: windows per forward pass."""
    device: str = "auto"
    """``--device``: auto, cuda or cpu."""
    tasks: tuple[str, ...] = ()
    """``--tasks``: lm-eval tasks to score zero-shot (``paper``: the BLISS paper's nine)."""
    task_data: str | None = None
    """``--task-data``: the folder holding each task's examples (``engine.eval.tasks``)."""
    task_batch_size: int = 16
    """``--task-batch``: examples per lm-eval forward pass."""
    task_limit: int | None = None
    """``--task-limit``: at most this many examples per task (a quick look, not the paper's figure)."""
    threads: int | None = None
    """Torch threads (``--threads`` as ``thread_plan`` resolved it); None leaves torch's own count."""

    def __post_init__(self) -> None:
        from engine.errors import UserError

        if not self.checkpoint:
            raise UserError("--checkpoint is required: a checkpoints/step_NNNNNN folder or a pretrain run directory")
        if self.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.seq_len is not None and self.seq_len < 1:
            raise UserError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.batch_size < 1:
            raise UserError(f"--batch must be at least 1, got {self.batch_size}")
        if self.tasks and not self.task_data:
            raise UserError("--tasks needs --task-data DIR: the folder holding each task's examples "
                            "(see the README, 'Downstream evaluation')")
        if self.task_data and not self.tasks:
            raise UserError("--task-data is only used with --tasks (e.g. --tasks paper)")

    def task_config(self):
        from engine.eval.tasks import TaskEvalConfig

        return TaskEvalConfig(tasks=self.tasks, task_data=Path(self.task_data), batch_size=self.task_batch_size,
                              device=self.device, limit=self.task_limit)


@dataclass(frozen=True)
class EvalOutcome:
    result: EvalResult | None
    """Validation loss, perplexity and bits per byte (None when only tasks were asked for)."""
    checkpoint: Path
    """The checkpoint folder evaluated."""
    recorded_in: Path | None
    """The run whose events.jsonl got the ``eval`` event; None for a checkpoint outside a run."""
    val: str | None
    tasks: Any | None = None
    """``engine.eval.tasks.TaskResults`` when ``--tasks`` was given."""


def run_eval(config: EvalConfig) -> EvalOutcome:
    """Evaluate the checkpoint (validation loss, and with ``tasks`` zero-shot accuracy) and record it
    in its run (when it is inside one): ``eval`` and ``tasks`` events, and ``report/eval.md``."""
    from engine.errors import UserError
    from engine.models.checkpoints import resolve_checkpoint, run_dir_of
    from engine.run_dir import RunDir

    task_config = config.task_config() if config.tasks else None  # flag errors before any work
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    folder = resolve_checkpoint(config.checkpoint)
    run_root = run_dir_of(folder)
    run = RunDir(run_root) if run_root is not None else None
    val = config.val
    if val is None and not config.tasks:
        val = (run.read_config().get("pretrain", {}).get("val") if run is not None else None)
        if not val:
            raise UserError("--val is required: this checkpoint was trained without a validation set")
    result = None
    if val is not None:
        result, _ = evaluate_checkpoint(folder, val, seq_len=config.seq_len, batch_size=config.batch_size,
                                        device=config.device)
    tasks = None
    if task_config is not None:
        from engine.eval.tasks import hf_tokenizer, run_tasks
        from engine.models.checkpoints import load_pretrained_model

        model, tokenizer_path = load_pretrained_model(folder)
        tasks = run_tasks(model, hf_tokenizer(tokenizer_path), task_config)
    if run is not None:
        with run.events("eval") as events:
            if result is not None:
                events.emit("eval", loss_val=result.loss, perplexity=result.perplexity,
                            bits_per_byte=result.bits_per_byte, checkpoint=str(folder), tokens=result.tokens,
                            bytes=result.bytes, val=str(val))
            if tasks is not None:
                events.emit("tasks", checkpoint=str(folder), **tasks.as_event())
        from engine.run_dir import atomic_write_bytes

        atomic_write_bytes(run.report / "eval.md", eval_report(folder, result, val, tasks).encode())
    return EvalOutcome(result=result, checkpoint=folder, recorded_in=run.root if run is not None else None,
                       val=str(val) if val is not None else None, tasks=tasks)


def eval_report(checkpoint: Path, result: EvalResult | None, val: str | None, tasks) -> str:
    """``report/eval.md``: the latest evaluation of the run, in the paper's table for the tasks."""
    lines = [f"# Evaluation: {checkpoint}", ""]
    if result is not None:
        bits = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "-"
        lines += [f"- validation ({val}): loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
                  f"bits per byte {bits} ({result.tokens:,} tokens)", ""]
    if tasks is not None:
        from engine.eval.compare import markdown_table
        from engine.eval.tasks import format_table

        header, *rows = format_table(tasks)
        lines += [f"Zero-shot accuracy (lm-eval {tasks.lm_eval_version}, {tasks.num_fewshot}-shot"
                  + (f", at most {tasks.limit} examples a task" if tasks.limit else "") + "), in percent:", "",
                  markdown_table(header, rows), ""]
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: str | Path,
    val_specs,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
) -> tuple[EvalResult, Path]:
    """Evaluate a pretrain checkpoint (folder or run) on the documents of ``val_specs``; returns the
    result and the checkpoint folder."""
    import torch
    from tokenizers import Tokenizer

    from engine.data.packing import tokenize_text_stream
    from engine.data.sources import read_texts
    from engine.data.tokenizer import end_of_text_id
    from engine.errors import UserError
    from engine.models.checkpoints import load_pretrained_model, read_meta, resolve_checkpoint
    from engine.runtime import resolve_device

    folder = resolve_checkpoint(checkpoint)
    meta = read_meta(folder)
    torch_device = resolve_device(device)
    model, tokenizer_path = load_pretrained_model(folder, device=str(torch_device))
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    texts = read_texts(val_specs)
    if not texts:
        raise UserError(f"no validation documents in {val_specs}")
    tokens, n_bytes = tokenize_text_stream(texts, tokenizer, leading_eot=True)
    seq_len = seq_len or meta.get("seq_len") or 2048
    if seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq_len}")
    if batch_size < 1:
        raise UserError(f"--batch must be at least 1, got {batch_size}")
    amp = torch.bfloat16 if torch_device.type == "cuda" else None
    nll, count = summed_nll(
        model, tokens, seq_len=seq_len, batch_size=batch_size, device=torch_device, autocast_dtype=amp,
        pad_id=end_of_text_id(tokenizer),
    )
    return eval_result(nll, count, n_bytes), folder
