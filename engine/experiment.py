"""Experiments that compare subsets by what they do to training: the demo's plan of stages, and the
command lines of each stage, shared with ``bench/quality.py``.

An experiment is a chain of ordinary blissctl commands, each run as its own process (as a user would
run it) in its own run directory: ``train-scorer`` → ``select`` once per arm → ``pretrain`` the same
model on each subset → ``eval`` each on the held-out target. Each stage knows how to tell that it has
already run (the run directory contract), so a rerun continues where the last one stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from engine.bliss import artifacts
from engine.errors import UserError
from engine.eval.compare import (
    composition,
    last_eval,
    pretrain_curve,
    read_manifest,
    stage_done,
    summarise_arms,
)
from engine.run_dir import RunDir, atomic_write_json, check_config_integers, check_run_name
from engine.runtime import plan_threads

DEMO_ARMS = ("bliss", "random")
REFERENCE_ARM = "random"


# ---- the command line of each stage ----------------------------------------------------------------


def repeated(flag: str, values: str | Sequence[str]) -> list[str]:
    """``--flag a --flag b`` for each value (one value may be given as a plain string)."""
    return [item for value in ([values] if isinstance(values, str) else values) for item in (flag, str(value))]


def train_scorer_argv(*, train: str | Sequence[str], val: str, run: str, runs_dir: Path, proxy: str, steps: int,
                      warmup_steps: int, seq_len: int, batch_size: int, seed: int, device: str = "cpu",
                      extra: tuple[str, ...] = ()) -> list[str]:
    return ["train-scorer", *repeated("--train", train), "--val", val, "--run", run, "--runs-dir", str(runs_dir),
            "--proxy", proxy, "--steps", str(steps), "--warmup-steps", str(warmup_steps), "--seq-len", str(seq_len),
            "--batch-size", str(batch_size), "--val-batch-size", str(batch_size), "--seed", str(seed),
            "--device", device, *extra]


def scorer_flags(arm: str, *, scorer_run: Path, val: str, chunks: int, tokenizer: Path | None = None) -> list[str]:
    """How each arm scores: BLISS with the scorer run's score model, the others with its tokenizer (or
    ``tokenizer``), so that every arm counts the same tokens."""
    tokenizer = str(tokenizer or scorer_run / "tokenizer.json")
    if arm == "bliss":
        return ["--scorer", "bliss", "--scorer-run", scorer_run.name, "--chunks", str(chunks)]
    if arm == "perplexity":
        return ["--scorer", "perplexity", "--scorer-run", scorer_run.name]
    if arm == "dsir":
        return ["--scorer", "dsir", "--val", val, "--tokenizer", tokenizer]
    if arm == "random":
        return ["--scorer", "random", "--tokenizer", tokenizer]
    raise UserError(f"unknown arm {arm!r}: choose bliss, random, dsir or perplexity")


def select_argv(*, arm: str, train: str | Sequence[str], val: str, budget: str, run: str, runs_dir: Path,
                scorer_run: Path, seq_len: int, seed: int, chunks: int = 1, exact_token_counts: bool = False,
                tokenizer: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    return ["select", *repeated("--input", train), "--budget", budget,
            *scorer_flags(arm, scorer_run=scorer_run, val=val, chunks=chunks, tokenizer=tokenizer),
            "--seq-len", str(seq_len),
            *(["--exact-token-counts"] if exact_token_counts else []), "--seed", str(seed), "--run", run,
            "--runs-dir", str(runs_dir), *extra]


def pretrain_argv(*, data: Path, run: str, runs_dir: Path, size: str, val: str, seq_len: int, batch_tokens: int,
                  steps: int, eval_every: int, seed: int, micro_batch: int | None = None, device: str = "cpu",
                  extra: tuple[str, ...] = ()) -> list[str]:
    """The same model, schedule and token count for every arm: only ``data`` differs."""
    micro = micro_batch or batch_tokens // seq_len
    return ["pretrain", "--data", str(data), "--run", run, "--runs-dir", str(runs_dir), "--size", size, "--val", val,
            "--seq-len", str(seq_len), "--global-batch-tokens", str(batch_tokens), "--micro-batch", str(micro),
            "--steps", str(steps), "--eval-every", str(eval_every), "--log-every", str(eval_every),
            "--save-every", str(steps), "--keep", "1", "--seed", str(seed), "--device", device,
            *(["--nproc-per-node", "1"] if device == "cpu" else []), *extra]


def eval_argv(*, checkpoint: Path, val: str, threads: tuple[str, ...] = ()) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--val", val, "--device", "cpu", *threads]


# ---- the demo --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """What the demo runs; recorded in RUNS_DIR/PREFIX.json so a rerun knows whether it may reuse results."""

    prefix: str = "demo"
    budget: str = "30%"
    proxy: str = "tiny"
    scorer_steps: int = 30
    scorer_warmup_steps: int = 100
    scorer_seq_len: int = 128
    scorer_batch_size: int = 16
    chunks: int = 4
    size: str = "tiny"
    seq_len: int = 128
    batch_tokens: int = 2048
    tokens: int = 400_000
    eval_points: int = 8
    seed: int = 0
    train: str = ""
    val: str = ""

    def __post_init__(self) -> None:
        check_config_integers(self)
        check_run_name(self.run("scorer"), "--prefix")
        if self.seq_len < 1 or self.batch_tokens % self.seq_len:
            raise UserError(f"--batch-tokens {self.batch_tokens} must be a positive multiple of --seq-len {self.seq_len}")
        for flag, value in (("--scorer-steps", self.scorer_steps), ("--scorer-warmup-steps", self.scorer_warmup_steps),
                            ("--eval-points", self.eval_points), ("--chunks", self.chunks), ("--tokens", self.tokens),
                            ("--scorer-seq-len", self.scorer_seq_len), ("--scorer-batch-size", self.scorer_batch_size)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.seed < 0:
            raise UserError(f"--seed must be 0 or more, got {self.seed}")

    def run(self, part: str) -> str:
        return f"{self.prefix}-{part}"

    @property
    def steps(self) -> int:
        return -(-self.tokens // self.batch_tokens)

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // max(1, self.eval_points))


@dataclass
class Stage:
    """One blissctl invocation of an experiment."""

    title: str
    argv: list[str]
    run_dir: Path
    done: Callable[[], bool]
    resumable: Callable[[], bool] = lambda: False
    timing: dict = field(default_factory=dict)
    round: int = 0
    """Which round of ``blissctl rounds`` it belongs to (the demo has one)."""
    role: str = ""
    """What it does in its round: ``select``, ``pretrain``, ``proxy``, ``train-scorer``, ``eval``."""
    beside_previous: bool = False
    """Runs side by side with the stage before it (neither reads what the other writes): the demo's two
    arms. Its command line then shares the cores (``pinned_threads(SIDE_BY_SIDE)``, ``select_threads``)."""


def pinned_threads(side_by_side: int = 1) -> tuple[str, ...]:
    """``--threads`` from the machine's cores alone (shared among ``side_by_side`` stages), not their
    load at the moment: the thread count changes the order of floating-point reductions, and the demo's
    figures must reproduce bit for bit on the same machine (a busy machine makes it slower, not
    different)."""
    return ("--threads", str(plan_threads(processes=side_by_side).threads))


SIDE_BY_SIDE = 2
"""The demo's arms run two at a time after train-scorer: the tiny models' operators are too short for
two intra-op threads to pay (one thread per process did 1.2x the tokens of two threads in one), and a
stage's start-up (imports, tokenising) leaves a core idle that the other arm's stage uses."""


def select_threads(arm: str) -> tuple[str, ...]:
    """BLISS's select keeps every core beside the random arm's: its scoring threads are sub-batches side by
    side with one torch thread each (no parallel region waits on a thread the other process holds up), and
    its scores do not depend on their number, while random's select mostly tokenises (measured: BLISS's
    select took 40 s alone on 2 threads and 53 s on 1 beside random's)."""
    return pinned_threads() if arm == "bliss" else pinned_threads(SIDE_BY_SIDE)


def plan(settings: DemoSettings, runs_dir: Path) -> list[Stage]:
    """The demo's stages in order, each with its command line and how to tell it has already run."""
    scorer = RunDir(runs_dir / settings.run("scorer"))
    stages = [Stage(
        title=f"train-scorer: {settings.proxy} proxy, {settings.scorer_warmup_steps} warm-up + "
              f"{settings.scorer_steps} bilevel steps",
        argv=train_scorer_argv(train=settings.train, val=settings.val, run=scorer.name, runs_dir=runs_dir,
                               proxy=settings.proxy, steps=settings.scorer_steps,
                               warmup_steps=settings.scorer_warmup_steps, seq_len=settings.scorer_seq_len,
                               batch_size=settings.scorer_batch_size, seed=settings.seed, extra=pinned_threads()),
        run_dir=scorer.root,
        done=lambda: stage_done(scorer.root, "train-scorer") and artifacts.score_model_path(scorer).exists(),
        resumable=lambda: artifacts.trainer_state_path(scorer).exists(),
    )]
    for arm in DEMO_ARMS:
        select = RunDir(runs_dir / settings.run(arm))
        # BLISS scores a document as the mean over its first few seq-len chunks (bench/README_quality.md: better
        # than the first chunk alone). Exact token counts for both arms, so that 30% means the same thing.
        stages.append(Stage(
            title=f"select: {settings.budget} of the tokens with {arm}",
            argv=select_argv(arm=arm, train=settings.train, val=settings.val, budget=settings.budget, run=select.name,
                             runs_dir=runs_dir, scorer_run=scorer.root, seq_len=settings.scorer_seq_len,
                             seed=settings.seed, chunks=settings.chunks, exact_token_counts=True,
                             extra=select_threads(arm)),
            run_dir=select.root, beside_previous=arm != DEMO_ARMS[0],
            done=lambda select=select: (select.selected / "manifest.json").exists(),
            resumable=lambda select=select: "select" in select.read_config(),
        ))
    for arm in DEMO_ARMS:
        lm = RunDir(runs_dir / settings.run(f"{arm}-lm"))
        stages.append(Stage(
            title=f"pretrain: {settings.size} model on the {arm} subset, {settings.steps * settings.batch_tokens:,} tokens",
            argv=pretrain_argv(data=runs_dir / settings.run(arm) / "selected", run=lm.name, runs_dir=runs_dir,
                               size=settings.size, val=settings.val, seq_len=settings.seq_len,
                               batch_tokens=settings.batch_tokens, steps=settings.steps,
                               eval_every=settings.eval_every, seed=settings.seed,
                               extra=pinned_threads(SIDE_BY_SIDE)),
            run_dir=lm.root, beside_previous=arm != DEMO_ARMS[0],
            done=lambda lm=lm: stage_done(lm.root, "pretrain"),
            resumable=lambda lm=lm: lm.checkpoints.is_dir() and any(lm.checkpoints.iterdir()),
        ))
    for arm in DEMO_ARMS:
        lm = runs_dir / settings.run(f"{arm}-lm")
        stages.append(Stage(
            title=f"eval: the {arm} model on the held-out passages",
            argv=eval_argv(checkpoint=lm, val=settings.val, threads=pinned_threads(SIDE_BY_SIDE)),
            run_dir=lm, beside_previous=arm != DEMO_ARMS[0],
            done=lambda lm=lm: last_eval(lm) is not None,
        ))
    return stages


def record_path(settings: DemoSettings, runs_dir: Path) -> Path:
    return runs_dir / f"{settings.prefix}.json"


def prepare_demo(settings: DemoSettings, runs_dir: Path, *, force: bool) -> list[Stage]:
    """The plan, after checking that earlier results in ``runs_dir`` were made with these settings
    (``force`` removes what the demo's runs wrote instead, and nothing else)."""
    stages = plan(settings, runs_dir)
    record = record_path(settings, runs_dir)
    if force:
        for stage in stages:
            RunDir(stage.run_dir).clear()
        record.unlink(missing_ok=True)
    elif record.exists() and orjson.loads(record.read_bytes()).get("settings") != asdict(settings):
        raise UserError(f"{record} holds a demo run with other settings; pass --force to redo it with these, "
                        "or --prefix to keep both")
    runs_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"settings": asdict(settings)})
    return stages


@dataclass(frozen=True)
class StageExit:
    """How a stage's process ended: its exit status, wall seconds, and the CPU-seconds it and its
    children used."""

    code: int
    wall_s: float
    cpu_s: float


def side_by_side_groups(stages: list[Stage]) -> list[list[tuple[int, Stage]]]:
    """``(number, stage)`` in runs of stages that go side by side (``beside_previous``), in order."""
    groups: list[list[tuple[int, Stage]]] = []
    for number, stage in enumerate(stages, 1):
        if stage.beside_previous and groups:
            groups[-1].append((number, stage))
        else:
            groups.append([(number, stage)])
    return groups


def run_stages(stages: list[Stage], runner: Callable[[list[str]], int],
               announce: Callable[[int, Stage, list[str] | None], None],
               finished: Callable[[Stage], None] | None = None,
               beside: Callable[[list[tuple[Stage, list[str]]]], list[StageExit]] | None = None) -> None:
    """Run each stage not yet done, in order (``--resume`` where it stopped half-way); ``announce`` is
    told of each (with the argv it runs, or None when it is already done), ``finished`` of each that ran
    to its end. Stages marked ``beside_previous`` run at once through ``beside`` (one after the other
    through ``runner`` without it). A failed stage stops the experiment with one line, once the stages
    beside it have ended."""
    import resource

    def children_cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def run_alone(argv: list[str]) -> StageExit:
        wall, cpu = time.perf_counter(), children_cpu_s()
        code = runner(argv)
        return StageExit(code, time.perf_counter() - wall, children_cpu_s() - cpu)

    groups = side_by_side_groups(stages) if beside is not None else [[pair] for pair in enumerate(stages, 1)]
    for group in groups:
        pending = []
        for number, stage in group:
            if stage.done():
                announce(number, stage, None)
                continue
            argv = [*stage.argv, *(["--resume"] if stage.resumable() else [])]
            announce(number, stage, argv)
            pending.append((number, stage, argv))
        if not pending:
            continue
        if len(pending) > 1:
            exits = beside([(stage, argv) for _, stage, argv in pending])
        else:
            exits = [run_alone(pending[0][2])]
        failed = None
        for (number, stage, argv), exit in zip(pending, exits, strict=True):
            stage.timing = {"wall_s": exit.wall_s, "cpu_s": exit.cpu_s}
            if exit.code != 0:
                failed = failed or (number, argv[0], exit.code)
            elif finished is not None:
                finished(stage)
        if failed is not None:
            number, command, code = failed
            raise UserError(f"stage {number} ({command}) failed with exit status {code}; see its messages above. "
                            "Run the same command again to continue from there, or with --force to start over")


def comparison(settings: DemoSettings, runs_dir: Path, arms: tuple[str, ...] = DEMO_ARMS) -> dict:
    """The figures the final table shows, also saved to RUNS_DIR/PREFIX-comparison.json."""
    curves = {arm: pretrain_curve(runs_dir / settings.run(f"{arm}-lm")) for arm in arms}
    evals = {arm: last_eval(runs_dir / settings.run(f"{arm}-lm")) for arm in arms}
    summaries = summarise_arms(curves, reference=REFERENCE_ARM, evals=evals)
    out = {}
    for summary in summaries:
        manifest = read_manifest(runs_dir / settings.run(summary.name) / "selected")
        out[summary.name] = {
            "documents_kept": manifest["documents"]["kept"], "documents_seen": manifest["documents"]["seen"],
            "tokens_kept": manifest["tokens"]["kept"], "tokens_seen": manifest["tokens"]["seen"],
            "val_loss": summary.final_loss, "bits_per_byte": summary.bits_per_byte,
            "perplexity": summary.perplexity, "speedup_vs_random": summary.speedup,
            "tokens_to_random_final_loss": summary.tokens_to_target,
            "curve": summary.curve, "composition": composition(manifest),
        }
    return {"settings": asdict(settings), "arms": out}
