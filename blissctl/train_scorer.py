"""Train the BLISS score model: bilevel optimisation against a small proxy LM.

The proxy is warmed up on random training documents, then each outer step trains it for K steps on score-weighted data and moves the score model along the hypergradient of the validation loss. The score model lands in runs/NAME/checkpoints/score-model.pt, ready for `blissctl select --scorer bliss`.

Example: blissctl train-scorer --train 'c4/en/c4-train.0000*.json.gz' --val val.jsonl --run bliss-14m --proxy 14m --steps 500

Example (a BLISS round: the proxy from the round-0 model, the score model continued, the latest model as the KL target):
blissctl train-scorer --train 'pool/part-2/*' --val val.jsonl --proxy-init r0-proxy --score-init r1-scorer --target r1-lm --run r2-scorer
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from blissctl.common import console, handles_user_errors

OUTER = "Bilevel (outer step settings)"
DATA = "Data"
RUN = "Run"


@handles_user_errors
def train_scorer_command(
    train: Annotated[list[str] | None, typer.Option("--train", metavar="PATH", help="Training pool: files, folders or globs (repeatable). Default: the embedded sample pool.", rich_help_panel=DATA)] = None,
    val: Annotated[str | None, typer.Option("--val", help="Validation documents. Default: the embedded narrative set.", rich_help_panel=DATA)] = None,
    run: Annotated[str | None, typer.Option("--run", help="Run name under --runs-dir. Default: bliss-<proxy>.", rich_help_panel=RUN)] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where runs live.", rich_help_panel=RUN)] = Path("runs"),
    proxy: Annotated[str | None, typer.Option("--proxy", help="Proxy preset: tiny, 14m, 31m, 70m, 160m, ... Default: 14m, or --proxy-init's.", rich_help_panel=RUN)] = None,
    steps: Annotated[int, typer.Option("--steps", help="Outer (bilevel) steps.", rich_help_panel=RUN)] = 200,
    warmup_steps: Annotated[int | None, typer.Option("--warmup-steps", help="Proxy warm-up steps on random data. Default: 100, or 0 with --proxy-init.", rich_help_panel=RUN)] = None,
    proxy_init: Annotated[str | None, typer.Option("--proxy-init", metavar="CKPT|RUN", help="Start the proxy from this model: a pretrain checkpoint or run (e.g. a round-0 model), or a train-scorer run's warmed-up proxy; its preset and tokenizer are used.", rich_help_panel=RUN)] = None,
    score_init: Annotated[str | None, typer.Option("--score-init", metavar="RUN", help="Continue this earlier score model (a train-scorer run or score-model.pt) instead of starting from the proxy's backbone.", rich_help_panel=RUN)] = None,
    inner_steps: Annotated[int, typer.Option("--inner-steps", help="K: proxy steps per outer step.", rich_help_panel=OUTER)] = 5,
    gamma: Annotated[float, typer.Option("--gamma", help="Weight of KL(target ‖ proxy); 0 without --target.", rich_help_panel=OUTER)] = 1e-2,
    l2: Annotated[float, typer.Option("--l2", help="λ: weight of ‖θp‖² in the lower objective.", rich_help_panel=OUTER)] = 1e-7,
    z_steps: Annotated[int, typer.Option("--z-steps", help="Gradient steps of the z-solve.", rich_help_panel=OUTER)] = 3,
    z_lr: Annotated[float, typer.Option("--z-lr", help="Step size of the z-solve.", rich_help_panel=OUTER)] = 1e-2,
    z_damping: Annotated[float, typer.Option("--z-damping", help="μ added to the Hessian.", rich_help_panel=OUTER)] = 1e-2,
    score_scale: Annotated[float, typer.Option("--score-scale", help="β in the batch weights softmax(β·s): above 1 lets the score model weight a batch's documents more unevenly.", rich_help_panel=OUTER)] = 1.0,
    z_clip: Annotated[float, typer.Option("--z-clip", help="Per-tensor norm bound of each z update (0: off).", rich_help_panel=OUTER)] = 1.0,
    hypergrad: Annotated[str, typer.Option("--hypergrad", help="fd (central differences, fast kernels, no graph), or the exact graph (reverse pass through ∇g's graph) and jvp (forward mode).", rich_help_panel=OUTER)] = "fd",
    z_hvp: Annotated[str, typer.Option("--z-hvp", help="Hessian-vector products of the z-solve: fd (difference of two gradients) or exact (double backward).", rich_help_panel=OUTER)] = "fd",
    fd_step: Annotated[float, typer.Option("--fd-step", help="Finite-difference step as a share of ‖θp‖.", rich_help_panel=OUTER)] = 1e-3,
    z_carry: Annotated[bool, typer.Option("--z-carry/--no-z-carry", help="Start each z-solve from the previous step's z (single loop).", rich_help_panel=OUTER)] = False,
    hypergrad_chunk: Annotated[int, typer.Option("--hypergrad-chunk", help="Documents per forward-mode pass of --hypergrad jvp (0: whole batch).", rich_help_panel=OUTER)] = 0,
    lr_proxy: Annotated[float | None, typer.Option("--lr-proxy", help="Proxy peak learning rate. Default: the preset's.", rich_help_panel=OUTER)] = None,
    lr_scorer: Annotated[float, typer.Option("--lr-scorer", help="Score model peak learning rate.", rich_help_panel=OUTER)] = 1e-4,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (both models).", rich_help_panel=OUTER)] = 0.1,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Gradient-norm clipping (0: off).", rich_help_panel=OUTER)] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training documents per step.", rich_help_panel=DATA)] = 32,
    val_batch_size: Annotated[int, typer.Option("--val-batch-size", help="Validation documents per outer step.", rich_help_panel=DATA)] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per document (its first ones).", rich_help_panel=DATA)] = 256,
    target: Annotated[str | None, typer.Option("--target", help="Pretraining checkpoint for the KL term.", rich_help_panel=DATA)] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="tokenizer.json, folder or hub id. Default: a BPE trained on --train, saved in the run.", rich_help_panel=DATA)] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary of the default BPE.", rich_help_panel=DATA)] = 8192,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.", rich_help_panel=RUN)] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed for init, data order, validation batches.", rich_help_panel=RUN)] = 0,
    probe_docs: Annotated[int, typer.Option("--probe-docs", help="Documents in the probe set of the score histograms.", rich_help_panel=RUN)] = 256,
    histogram_every: Annotated[int, typer.Option("--histogram-every", help="Outer steps between score histograms.", rich_help_panel=RUN)] = 25,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.", rich_help_panel=RUN)] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last checkpoint.", rich_help_panel=RUN)] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="Also write TensorBoard scalars in runs/NAME/tensorboard/.", rich_help_panel=RUN)] = True,
    threads: Annotated[int | None, typer.Option("--threads", help="Torch threads. Default: the cores other work leaves idle (printed at start).", rich_help_panel=RUN)] = None,
) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from engine.bliss.config import TrainScorerConfig
    from engine.bliss.train import run_train_scorer
    from engine.data.sample import sample_pool_glob, sample_val_path
    from engine.run_dir import RunDir
    from engine.runtime import thread_plan

    plan = thread_plan(requested=threads)
    if proxy_init is not None and proxy is None:
        from engine.bliss.artifacts import find_proxy_init

        proxy = find_proxy_init(proxy_init, runs_dir).preset
    proxy = proxy or "14m"
    if warmup_steps is None:
        warmup_steps = 0 if proxy_init else 100

    config = TrainScorerConfig(
        train=tuple(train) if train else (sample_pool_glob(),), val=val or str(sample_val_path()), proxy=proxy,
        steps=steps, warmup_steps=warmup_steps, inner_steps=inner_steps, gamma=gamma, l2=l2, z_steps=z_steps,
        z_lr=z_lr, z_damping=z_damping, z_clip=z_clip, score_scale=score_scale, hypergrad=hypergrad, hypergrad_chunk=hypergrad_chunk, lr_proxy=lr_proxy, lr_scorer=lr_scorer,
        z_hvp=z_hvp, fd_step=fd_step, z_carry=z_carry,
        weight_decay=weight_decay, grad_clip=grad_clip, batch_size=batch_size, val_batch_size=val_batch_size,
        seq_len=seq_len, target=target, proxy_init=proxy_init, score_init=score_init, tokenizer=tokenizer, vocab_size=vocab_size, device=device, seed=seed,
        probe_docs=probe_docs, histogram_every=histogram_every, checkpoint_every=checkpoint_every, resume=resume,
        tensorboard=tensorboard, threads=plan.threads,
    )
    console.print(f"[dim]{plan.describe()}[/]")
    run_dir = RunDir.named(f"bliss-{proxy}" if run is None else run, runs_dir)
    total = config.warmup_steps + config.steps

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[figures]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )
    task = progress.add_task("warm-up", total=total, figures="")

    def on_event(kind: str, figures: dict) -> None:
        if kind == "start":  # the bar appears once inputs, tokenizer and models are ready
            progress.start()
            if figures.get("resumed_at_step") is not None:
                progress.update(task, completed=(figures["resumed_at_warmup_step"] or 0) + figures["resumed_at_step"])
        elif kind == "warmup":
            progress.update(task, completed=figures["step"], figures=f"loss {figures['loss']:.3f}")
        elif kind == "step":
            progress.update(
                task, description="outer", completed=config.warmup_steps + figures["step"],
                figures=(f"lower {figures['loss_lower']:.3f}  val {figures['loss_upper']:.3f}  "
                         f"‖∇Φ‖ {figures['hypergrad_norm']:.2e}  H(P) {figures['weight_entropy']:.2f}"))

    try:
        result = run_train_scorer(config, run_dir, on_event=on_event)
    finally:
        if progress.live.is_started:
            progress.stop()

    console.print(
        f"[bold green]done[/]: {result.steps} outer steps in {result.elapsed_s:.1f} s; "
        f"final validation loss {result.loss_val:.4f}\n"
        f"score model: {result.score_model}\n"
        f"next: blissctl select --scorer bliss --scorer-run {run_dir.name} --runs-dir {runs_dir} ...",
        soft_wrap=True,
    )
