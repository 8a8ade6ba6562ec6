"""``blissctl rounds``: the full BLISS method — selection and pretraining alternate, and the score model
learns from the model being pretrained.

As the reference implementation runs it (``../shared/BLISS.md``), on a pool split into disjoint parts,
one per round (``engine.data.pool_split``):

- round 0: a random ``--budget`` of part 0; pretrain the model on it (``r0-lm``), and the proxy on the
  same data (``r0-proxy``);
- round r ≥ 1: ``train-scorer`` on part r with the proxy reset to ``r0-proxy`` and both optimisers
  fresh, the score model continued from round r−1 (round 1: the proxy's backbone) and the latest
  pretrained model as the KL target (``r{r}-scorer``); ``select`` the top ``--budget`` of part r with
  it (``r{r}-select``); continue pretraining the model, weights and AdamW, on the selection at a
  constant rate ``lr·0.5^r`` (``r{r}-lm``); a side branch cools the rate down over ``--decay-steps``
  and is evaluated (``r{r}-lm/decayed``); the next round continues from the undecayed model.

Each stage is an ordinary blissctl command run as its own process, in its own run directory under the
experiment's folder ``RUNS_DIR/NAME/`` (``experiment.json`` lists them), so any stage can be inspected,
rerun by hand and watched with the dashboard. A stopped experiment continues with ``--resume`` from
its last finished stage (a half-done stage resumes itself); every stage is deterministic, so the
result equals an uninterrupted run.

Control arms run the same rounds with another scorer: ``--scorer random`` (random rounds) or ``dsir``;
``--scorer-rounds 1`` trains the score model in round 1 only and reuses it (single-round BLISS).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from engine.data.pool_split import SPLIT_FILE, SPLITS, PoolSplit, choose_mode, deal_shards, split_pool
from engine.errors import UserError
from engine.eval.compare import composition, gpu_seconds, pretrain_curve, read_manifest, stage_done
from engine.experiment import Stage, pretrain_argv, select_argv, train_scorer_argv
from engine.models.presets import model_preset
from engine.run_dir import RunDir, atomic_write_json, check_config_integers, check_run_name
from engine.select.budget import parse_budget

EXPERIMENT_FILE = "experiment.json"
RESULT_FILE = "rounds-result.json"
REPORT_FILE = "rounds.md"
ARMS = ("bliss", "random", "dsir")
PROBE_DOCUMENTS = 512
"""Documents of part 0 (which no BLISS round selects from) every round's score model scores, for the
drift between rounds."""


@dataclass(frozen=True, kw_only=True)
class RoundsSettings:
    """Everything ``blissctl rounds`` runs; recorded in ``experiment.json`` so a rerun knows whether it
    may continue. Defaults run on the embedded sample in a few minutes on 2 cores (README: the measured time)."""

    pool: tuple[str, ...]
    """``--pool``: the candidate documents (files, folders, globs), split into ``rounds + 1`` parts."""
    val: str
    """``--val``: the target documents the score model learns to lower the loss on."""
    eval_val: str = ""
    """``--eval-val``: documents the pretrained models are evaluated on (default: ``--val``; keep them
    apart from ``--val`` for an honest figure)."""
    rounds: int = 2
    """``--rounds``: R selection rounds after round 0."""
    scorer: str = "bliss"
    """``--scorer``: ``bliss``, or a control arm: ``random`` (random rounds), ``dsir``."""
    scorer_rounds: int = 0
    """``--scorer-rounds``: train the score model in the first N rounds only and select later rounds
    with the last one (1: single-round BLISS); 0: every round."""
    split: str = "auto"
    """``--split``: ``shard``, ``hash`` or ``auto`` (``engine.data.pool_split.choose_mode``)."""
    budget: str = "20%"
    """``--budget``: what each round keeps of its part (the paper: 20% of the documents)."""
    unit: str = "tokens"
    """``--unit``: what the budget counts, ``tokens`` or ``docs``."""
    size: str = "tiny"
    """``--size``: the model pretrained over the rounds."""
    seq_len: int = 128
    batch_tokens: int = 2048
    round_tokens: int = 100_000
    """``--round-tokens``: pretraining tokens of each round (round 0 included), rounded up to whole steps."""
    lr: float | None = None
    """``--lr``: round 0's constant learning rate (default: the preset's); round r uses lr·lr_factor^r."""
    lr_factor: float = 0.5
    """``--lr-factor``: the learning rate of each round relative to the one before (the reference: 0.5)."""
    decay_steps: int | None = None
    """``--decay-steps``: steps of each round's evaluation branch (default: a tenth of a round's steps)."""
    eval_points: int = 2
    """``--eval-points``: validation evaluations of the main line in each round."""
    proxy: str = "tiny"
    """``--proxy``: preset of the proxy LM and score model."""
    proxy_steps: int = 100
    """``--proxy-steps``: round 0's pretraining of the proxy (the reference: 10k steps)."""
    scorer_steps: int = 30
    """``--scorer-steps``: outer (bilevel) steps of each round's train-scorer."""
    scorer_seq_len: int = 128
    scorer_batch_size: int = 16
    inner_steps: int = 2
    """``--inner-steps``: K, the proxy's steps per outer step (the reference: 5)."""
    z_steps: int = 1
    """``--z-steps``: iterations of each outer step's z-solve (the reference: 3). One step makes z = η_z·v
    with no Hessian product, and an outer step about a third as dear (``bench/README_bliss.md``); with K = 2
    as well, the tuning bench's rounds selected as well as the reference's 3 z-steps and K = 5 at equal CPU
    (README, "Tuning")."""
    lr_proxy: float | None = None
    """``--lr-proxy``: the proxy's rate in the bilevel phase (default: the preset's)."""
    lr_scorer: float = 1e-3
    """``--lr-scorer``: the score model's AdamW rate (the reference: 1e-5, over 6,000 outer steps a round;
    with tens of steps, 1e-3 trained better models than 1e-4 on both tuning targets)."""
    gamma: float = 1e-2
    """``--gamma``: weight of KL(latest model ‖ proxy) in the lower objective (the reference: 1e-2)."""
    score_scale: float = 1.0
    """``--score-scale``: β in the bilevel batch weights softmax(β·s) (the reference: 1)."""
    chunks: int = 4
    """``--chunks``: BLISS scores a document as the mean over its first N scorer-seq-len chunks."""
    seed: int = 0
    device: str = "cpu"
    """``--device``: ``cpu``, ``cuda`` or ``auto`` for every stage."""
    tokenizer: str | None = None
    """``--tokenizer``: the experiment's tokenizer (a tokenizer.json or hub id); default: a BPE trained on
    part 0 by round 0's select. Every stage uses round 0's saved copy."""
    round0_from: str | None = None
    """``--round0-from``: another experiment whose round 0 this one starts from (copied, not rerun): arms
    and score-model settings compared on one round 0, which does not depend on them."""

    def __post_init__(self) -> None:
        check_config_integers(self)
        if not self.pool:
            raise UserError("--pool is required")
        if self.scorer not in ARMS:
            raise UserError(f"--scorer must be one of {', '.join(ARMS)}, got {self.scorer!r}")
        if self.split not in SPLITS:
            raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for flag, value in (("--rounds", self.rounds), ("--round-tokens", self.round_tokens),
                            ("--eval-points", self.eval_points), ("--proxy-steps", self.proxy_steps),
                            ("--scorer-steps", self.scorer_steps), ("--scorer-seq-len", self.scorer_seq_len),
                            ("--scorer-batch-size", self.scorer_batch_size), ("--inner-steps", self.inner_steps),
                            ("--chunks", self.chunks), ("--seq-len", self.seq_len), ("--z-steps", self.z_steps)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.scorer_rounds < 0 or self.seed < 0:
            raise UserError("--scorer-rounds and --seed must be 0 or more")
        if self.decay_steps is not None and self.decay_steps < 0:
            raise UserError(f"--decay-steps must be 0 or more, got {self.decay_steps}")
        if self.batch_tokens < self.seq_len or self.batch_tokens % self.seq_len:
            raise UserError(f"--batch-tokens {self.batch_tokens} must be a positive multiple of --seq-len {self.seq_len}")
        if not (0 < self.lr_factor <= 1 and math.isfinite(self.lr_factor)):
            raise UserError(f"--lr-factor must be in (0, 1], got {self.lr_factor}")
        for flag, value in (("--lr", self.lr), ("--lr-proxy", self.lr_proxy), ("--lr-scorer", self.lr_scorer),
                            ("--score-scale", self.score_scale)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UserError(f"{flag} must be a positive number, got {value}")
        if self.unit not in ("tokens", "docs"):
            raise UserError(f"--unit {self.unit!r}: choose tokens or docs")
        if self.device not in ("cpu", "cuda", "auto"):
            raise UserError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        model_preset(self.size), model_preset(self.proxy)  # one-line errors naming the presets
        parse_budget(self.budget)

    @property
    def round_steps(self) -> int:
        return -(-self.round_tokens // self.batch_tokens)

    @property
    def branch_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else max(1, self.round_steps // 10)

    @property
    def eval_every(self) -> int:
        return max(1, self.round_steps // self.eval_points)

    @property
    def parts(self) -> int:
        return self.rounds + 1

    def round_lr(self, r: int) -> float:
        return (self.lr or model_preset(self.size).lr) * self.lr_factor ** r

    def trains_scorer(self, r: int) -> bool:
        return self.scorer == "bliss" and r >= 1 and (self.scorer_rounds == 0 or r <= self.scorer_rounds)


# ---- the plan -----------------------------------------------------------------------------------------


def stage_run(r: int, role: str) -> str:
    return f"r{r}-" + {"select": "select", "pretrain": "lm", "proxy": "proxy", "train-scorer": "scorer"}[role]


def part_inputs(exp: Path, split: PoolSplit | None, r: int) -> list[str]:
    """What round ``r`` reads: its shards, or its folder of hashed documents (also before the split is
    written, for ``--dry-run``)."""
    if split is not None and split.mode == "shard":
        return list(split.parts[r])
    return [str(exp / "pool" / f"part-{r}")]


def plan_rounds(settings: RoundsSettings, exp: Path, split: PoolSplit | None, threads: tuple[str, ...] = ()
                ) -> list[Stage]:
    """Every stage of the experiment, in order, each with its command line and how to tell it has run."""
    stages: list[Stage] = []
    tokenizer = exp / stage_run(0, "select") / "tokenizer.json"  # round 0 trains it; every stage shares it
    last_scorer: str | None = None
    for r in range(settings.parts):
        inputs = part_inputs(exp, split, r)
        select = RunDir(exp / stage_run(r, "select"))
        if settings.trains_scorer(r):
            scorer = RunDir(exp / stage_run(r, "train-scorer"))
            extra = ["--proxy-init", str(exp / stage_run(0, "proxy")), "--target",
                     str(exp / stage_run(r - 1, "pretrain")), "--gamma", f"{settings.gamma:g}",
                     "--lr-scorer", f"{settings.lr_scorer:g}", "--inner-steps", str(settings.inner_steps),
                     "--z-steps", str(settings.z_steps), "--score-scale", f"{settings.score_scale:g}",
                     "--checkpoint-every", str(max(1, settings.scorer_steps // 3)), "--no-tensorboard",
                     *(["--lr-proxy", f"{settings.lr_proxy:g}"] if settings.lr_proxy else []),
                     *(["--score-init", str(exp / last_scorer)] if last_scorer else []), *threads]
            stages.append(Stage(
                title=f"round {r}: train the score model on part {r} against the round-{r - 1} model",
                argv=train_scorer_argv(train=inputs, val=settings.val, run=scorer.name, runs_dir=exp,
                                       proxy=settings.proxy, steps=settings.scorer_steps, warmup_steps=0,
                                       seq_len=settings.scorer_seq_len, batch_size=settings.scorer_batch_size,
                                       seed=settings.seed + r, device=settings.device, extra=tuple(extra)),
                run_dir=scorer.root, round=r, role="train-scorer",
                done=lambda scorer=scorer: stage_done(scorer.root, "train-scorer"),
                resumable=lambda scorer=scorer: (scorer.checkpoints / "train-scorer-state.pt").exists(),
            ))
            last_scorer = scorer.name
        arm = "random" if r == 0 else settings.scorer
        scorer_run = exp / last_scorer if (arm == "bliss" and last_scorer) else select.root
        argv = select_argv(arm=arm, train=inputs, val=settings.val, budget=settings.budget, run=select.name,
                           runs_dir=exp, scorer_run=scorer_run, seq_len=settings.scorer_seq_len,
                           seed=settings.seed + r, chunks=settings.chunks, exact_token_counts=True,
                           tokenizer=tokenizer, extra=("--unit", settings.unit, "--device", _select_device(settings),
                                                       *threads))
        if r == 0:  # round 0 sets the experiment's tokenizer (saved in its run): the given one, or a BPE of part 0
            at = argv.index("--tokenizer")
            argv[at : at + 2] = ["--tokenizer", settings.tokenizer] if settings.tokenizer else []
        stages.append(Stage(
            title=f"round {r}: select {settings.budget} of part {r} with {arm}",
            argv=argv, run_dir=select.root, round=r, role="select",
            done=lambda select=select: (select.selected / "manifest.json").exists(),
            resumable=lambda select=select: "select" in select.read_config(),
        ))
        lm = RunDir(exp / stage_run(r, "pretrain"))
        extra = ["--lr", f"{settings.round_lr(r):g}", "--lr-schedule", "constant",
                 "--decay-steps", str(settings.branch_steps), "--no-tensorboard"]
        if r > 0:
            extra += ["--init-from", str(exp / stage_run(r - 1, "pretrain")), "--warmup", "0"]
        stages.append(Stage(
            title=(f"round {r}: pretrain {settings.size} on the selection, {settings.round_steps} steps at "
                   f"lr {settings.round_lr(r):g}" + (f", continuing round {r - 1}'s model" if r else "")),
            argv=pretrain_argv(data=select.selected, run=lm.name, runs_dir=exp, size=settings.size,
                               val=settings.eval_val or settings.val, seq_len=settings.seq_len,
                               batch_tokens=settings.batch_tokens, steps=settings.round_steps,
                               eval_every=settings.eval_every, seed=settings.seed, device=settings.device,
                               extra=(*extra, *threads)),
            run_dir=lm.root, round=r, role="pretrain",
            done=lambda lm=lm: stage_done(lm.root, "pretrain"),
            resumable=lambda lm=lm: lm.checkpoints.is_dir() and any(lm.checkpoints.iterdir()),
        ))
        if r == 0 and any(settings.trains_scorer(k) for k in range(1, settings.parts)):
            proxy = RunDir(exp / stage_run(0, "proxy"))
            stages.append(Stage(
                title=f"round 0: pretrain the {settings.proxy} proxy on the same data, {settings.proxy_steps} steps",
                argv=pretrain_argv(data=select.selected, run=proxy.name, runs_dir=exp, size=settings.proxy,
                                   val=settings.eval_val or settings.val, seq_len=settings.scorer_seq_len,
                                   batch_tokens=settings.scorer_batch_size * settings.scorer_seq_len,
                                   steps=settings.proxy_steps, eval_every=settings.proxy_steps,
                                   seed=settings.seed, device=settings.device,
                                   extra=("--no-tensorboard", *threads)),
                run_dir=proxy.root, round=0, role="proxy",
                done=lambda proxy=proxy: stage_done(proxy.root, "pretrain"),
                resumable=lambda proxy=proxy: proxy.checkpoints.is_dir() and any(proxy.checkpoints.iterdir()),
            ))
    return stages


def _select_device(settings: RoundsSettings) -> str:
    """``select`` takes cpu or cuda (its model scorers run where they are told)."""
    if settings.device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def command_lines(stages: list[Stage]) -> list[str]:
    import shlex

    return ["blissctl " + shlex.join(stage.argv) for stage in stages]


# ---- the experiment folder ---------------------------------------------------------------------------


def experiment_record(settings: RoundsSettings, name: str, stages: list[Stage], timings: dict,
                      split: PoolSplit | None) -> dict[str, Any]:
    return {
        "kind": "rounds", "name": name, "settings": asdict(settings),
        "split": {"mode": split.mode, "documents": split.documents} if split is not None else None,
        "stages": [{"round": s.round, "role": s.role, "run": s.run_dir.name, "title": s.title, "argv": s.argv}
                   for s in stages],
        "timings": timings,
    }


def _settings_dict(settings: RoundsSettings) -> dict:
    return orjson.loads(orjson.dumps(asdict(settings)))


SETTINGS_BEFORE = {"z_steps": 3, "round0_from": None}
"""Settings added since experiments were first recorded, at the value those experiments ran with."""

ROUND_ONWARD = frozenset({"scorer", "scorer_rounds", "scorer_steps", "inner_steps", "z_steps", "lr_proxy",
                          "lr_scorer", "gamma", "score_scale", "lr_factor", "round0_from"})
"""Settings that round 0 does not depend on (it pretrains on a random share whatever the arm): two
experiments that differ only in these have the same round 0, so one may start from the other's."""


def recorded_settings(record: dict) -> dict:
    return {**SETTINGS_BEFORE, **(record.get("settings") or {})}


def _round0_done_in(source: Path, settings: RoundsSettings) -> dict[str, bool]:
    """Which of this experiment's round-0 stages ``source`` finished, asked the way its own plan asks."""
    return {s.run_dir.name: s.done() for s in plan_rounds(settings, source, None) if s.round == 0}


def copy_round0(settings: RoundsSettings, exp: Path, stages: list[Stage], timings: dict,
                say: Callable[[str], None] = lambda line: None) -> None:
    """Start from ``--round0-from``'s finished round-0 stages: copied into this experiment (so it stays
    whole if the other one is removed), their timings with them. A stage the other experiment lacks (the
    proxy of a random arm) runs here as usual."""
    import shutil

    source = Path(settings.round0_from)
    record_path = source / EXPERIMENT_FILE
    if not record_path.exists():
        raise UserError(f"--round0-from {source}: not a blissctl rounds experiment (no {EXPERIMENT_FILE})")
    record = orjson.loads(record_path.read_bytes())
    theirs, ours = recorded_settings(record), _settings_dict(settings)
    differ = sorted(k for k in ours if k not in ROUND_ONWARD and theirs.get(k) != ours[k])
    if differ:
        raise UserError(f"--round0-from {source.name}: its round 0 ran with other "
                        f"{', '.join('--' + k.replace('_', '-') for k in differ)}; round 0 must match to be shared")
    done_there = _round0_done_in(source, settings)
    for stage in stages:
        # A stage begun here (not a copy: copies arrive whole, by rename) resumes itself instead.
        if stage.round != 0 or stage.run_dir.exists() or not done_there.get(stage.run_dir.name):
            continue
        origin = source / stage.run_dir.name
        partial = stage.run_dir.with_name(stage.run_dir.name + ".copying")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(origin, partial, ignore=shutil.ignore_patterns(".lock"))
        partial.rename(stage.run_dir)
        if stage.run_dir.name in (record.get("timings") or {}):
            timings[stage.run_dir.name] = dict(record["timings"][stage.run_dir.name], copied_from=str(source))
        say(f"round 0: {stage.run_dir.name} copied from {origin}")


def prepare_experiment(settings: RoundsSettings, exp: Path, *, resume: bool, force: bool) -> dict:
    """Check ``exp`` against these settings and return its timings so far: a new experiment starts, one
    with other settings is refused, a stopped one needs ``--resume``; ``force`` removes only what the
    experiment wrote."""
    record_path = exp / EXPERIMENT_FILE
    if force:
        clear_experiment(exp)
    if not record_path.exists():
        if exp.exists() and any(p.name != ".lock" for p in exp.iterdir()):
            raise UserError(f"{exp} exists and is not a blissctl rounds experiment (no {EXPERIMENT_FILE}); "
                            "choose another --run")
        return {}
    record = orjson.loads(record_path.read_bytes())
    if record.get("kind") != "rounds":
        raise UserError(f"{record_path} is not a rounds experiment")
    recorded = recorded_settings(record)
    if recorded != _settings_dict(settings):
        changed = sorted(k for k, v in _settings_dict(settings).items() if recorded.get(k) != v)
        raise UserError(f"experiment {exp.name} was run with other settings ({', '.join('--' + k.replace('_', '-') for k in changed)}); "
                        "pass --force to redo it with these, or choose another --run")
    finished = (exp / RESULT_FILE).exists()
    if not resume and not finished:
        raise UserError(f"experiment {exp.name} has stopped part-way; pass --resume to continue it from its last "
                        "finished stage, or --force to start over")
    return dict(record.get("timings") or {})


def clear_experiment(exp: Path) -> None:
    """Remove what ``rounds`` and its stages wrote in ``exp`` (not anything else a user put there)."""
    import contextlib
    import shutil

    if not exp.is_dir():
        return
    record = exp / EXPERIMENT_FILE
    runs = []
    if record.exists():
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
            runs = [stage["run"] for stage in orjson.loads(record.read_bytes())["stages"]]
    for name in runs:
        check_run_name(name)
        RunDir(exp / name).clear()
        copying = exp / f"{name}.copying"  # a --round0-from copy cut short
        if copying.is_dir() and not copying.is_symlink():
            shutil.rmtree(copying)
    pool = exp / "pool"
    if pool.is_dir() and not pool.is_symlink():
        for part in pool.glob("part-*"):
            if part.is_dir() and not part.is_symlink():
                for shard in part.iterdir():
                    if shard.is_file() and shard.name.endswith(".jsonl.zst"):
                        shard.unlink()
                with contextlib.suppress(OSError):
                    part.rmdir()
        with contextlib.suppress(OSError):
            pool.rmdir()
    for name in (SPLIT_FILE, RESULT_FILE, REPORT_FILE, EXPERIMENT_FILE, ".lock"):
        (exp / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        exp.rmdir()


def check_budget_leaves_rounds_something(settings: RoundsSettings, split: PoolSplit) -> None:
    """A share so small that a round would keep no document is refused before any work."""
    budget = parse_budget(settings.budget)
    if split.documents is None or budget.fraction is None or settings.unit != "docs":
        return
    smallest = min(split.documents)
    if math.floor(budget.fraction * smallest) < 1:
        raise UserError(f"--budget {settings.budget} of {smallest} documents (the smallest round's part) keeps none; "
                        "raise --budget or use fewer --rounds")


def check_selection_kept_something(stage: Stage) -> None:
    if stage.role != "select":
        return
    manifest = read_manifest(stage.run_dir / "selected")
    if manifest["documents"]["kept"] == 0:
        raise UserError(f"round {stage.round}'s selection ({stage.run_dir}) kept no document; raise --budget "
                        "or use fewer --rounds")


# ---- running ------------------------------------------------------------------------------------------


def run_rounds(settings: RoundsSettings, exp: Path, *, runner: Callable[[list[str]], int],
               announce: Callable[[int, Stage, list[str] | None], None], resume: bool = False, force: bool = False,
               threads: tuple[str, ...] = (), say: Callable[[str], None] = lambda line: None) -> dict:
    """Run (or continue) the experiment in ``exp``; returns the per-round results (also written to
    ``exp/rounds-result.json`` and ``exp/rounds.md``)."""
    from engine.experiment import run_stages

    check_run_name(exp.name)
    timings = prepare_experiment(settings, exp, resume=resume, force=force)
    exp.mkdir(parents=True, exist_ok=True)
    with RunDir(exp).lock("rounds"):
        # The record first: an experiment killed while its pool is split is still one --resume knows.
        if not (exp / EXPERIMENT_FILE).exists():
            atomic_write_json(exp / EXPERIMENT_FILE, experiment_record(settings, exp.name, [], timings, None))
        split = split_pool(settings.pool, settings.parts, exp, seed=settings.seed, mode=settings.split,
                           progress=lambda label: say(f"split: {label}"))
        check_budget_leaves_rounds_something(settings, split)
        stages = plan_rounds(settings, exp, split, threads)
        if settings.round0_from:
            copy_round0(settings, exp, stages, timings, say)
        atomic_write_json(exp / EXPERIMENT_FILE, experiment_record(settings, exp.name, stages, timings, split))

        def finished(stage: Stage) -> None:
            timings[stage.run_dir.name] = {k: round(v, 3) for k, v in stage.timing.items()}
            atomic_write_json(exp / EXPERIMENT_FILE, experiment_record(settings, exp.name, stages, timings, split))
            check_selection_kept_something(stage)

        def announce_checked(number: int, stage: Stage, argv: list[str] | None) -> None:
            if argv is None:  # done before a resume: an empty selection still stops what would train on it
                check_selection_kept_something(stage)
            announce(number, stage, argv)

        run_stages(stages, runner=runner, announce=announce_checked, finished=finished)
        result = rounds_result(settings, exp, stages, timings, split)
        atomic_write_json(exp / RESULT_FILE, result)
        (exp / REPORT_FILE).write_text(markdown_report(result))
    return result


def dry_run_plan(settings: RoundsSettings, exp: Path, threads: tuple[str, ...] = ()) -> list[str]:
    """The command lines the experiment will run, without writing anything (the split is planned, not
    made: a hash split's parts are the folders it will write)."""
    from engine.data.sources import discover_shards

    split = None
    recorded = exp / SPLIT_FILE
    if recorded.exists():
        split = PoolSplit.from_dict(orjson.loads(recorded.read_bytes()))
    else:
        shards = discover_shards(list(settings.pool))
        mode = choose_mode(len(shards), settings.parts, settings.split)
        if mode == "shard":
            split = PoolSplit(mode="shard", parts=deal_shards(shards, settings.parts))
    stages = plan_rounds(settings, exp, split, threads)
    if not settings.round0_from:
        return command_lines(stages)
    source = Path(settings.round0_from)
    done_there = _round0_done_in(source, settings)
    return [f"# copy {stage.run_dir.name} from {source / stage.run_dir.name}"
            if stage.round == 0 and done_there.get(stage.run_dir.name) else line
            for stage, line in zip(stages, command_lines(stages), strict=True)]


# ---- results ------------------------------------------------------------------------------------------


def rounds_result(settings: RoundsSettings, exp: Path, stages: list[Stage], timings: dict,
                  split: PoolSplit) -> dict:
    """Per round: the evaluation branch's validation loss, the main line's, the tokens trained, the
    selection's size, threshold and composition, the score model's drift from the round before, and the
    CPU-seconds and GPU-seconds of each stage. Only the rounds finished so far (all of them once the
    experiment has run; ``complete`` says which)."""
    finished = 0
    while finished < settings.parts and all(s.done() for s in stages if s.round == finished):
        finished += 1
    stages = [s for s in stages if s.round < finished]
    rounds = []
    drift = score_model_drift(exp, stages, split, settings)
    for r in range(finished):
        lm = exp / stage_run(r, "pretrain")
        main, decayed = pretrain_curve(lm), pretrain_curve(lm, branch="decay")
        manifest = read_manifest(exp / stage_run(r, "select") / "selected")
        in_round = [s for s in stages if s.round == r]
        costs = {s.role: timings.get(s.run_dir.name, {}) for s in in_round}
        gpu = {s.role: gpu_seconds(s.run_dir, s.argv[0]) for s in in_round}  # argv[0]: the command, its events' stage
        rounds.append({
            "round": r,
            "scorer": "random" if r == 0 else settings.scorer,
            "score_model": next((s.run_dir.name for s in in_round if s.role == "train-scorer"), None),
            "val_loss": decayed[-1][1] if decayed else None,
            "val_loss_main": main[-1][1] if main else None,
            "tokens": main[-1][0] if main else None,
            "lr": settings.round_lr(r),
            "documents_seen": manifest["documents"]["seen"], "documents_kept": manifest["documents"]["kept"],
            "tokens_kept": manifest["tokens"]["kept"], "threshold": manifest.get("score_threshold"),
            "composition": composition(manifest),
            "drift_spearman": drift.get(r),
            "cost_cpu_s": round(sum(cost.get("cpu_s", 0.0) for cost in costs.values()), 1),
            "cost_cpu_s_by_stage": {role: cost.get("cpu_s") for role, cost in costs.items()},
            "selection_cpu_s": sum(cost.get("cpu_s", 0.0) for role, cost in costs.items() if role != "pretrain"),
            "pretrain_cpu_s": costs.get("pretrain", {}).get("cpu_s"),
            "gpu_s_by_stage": gpu,
            "selection_gpu_s": round(sum(v for role, v in gpu.items() if role != "pretrain"), 1),
            "pretrain_gpu_s": gpu.get("pretrain", 0.0),
        })
    curve: list[tuple[int, float]] = []
    for r in range(finished):
        curve += pretrain_curve(exp / stage_run(r, "pretrain"))
    decayed_points = [(row["tokens"], row["val_loss"]) for row in rounds if row["val_loss"] is not None]
    last = rounds[-1] if rounds else {}
    return {"name": exp.name, "settings": _settings_dict(settings), "split": {"mode": split.mode,
            "documents": split.documents}, "rounds": rounds, "curve": curve, "decayed": decayed_points,
            "final_val_loss": last.get("val_loss"), "total_tokens": last.get("tokens"),
            "complete": finished == settings.parts}


def result_so_far(exp: Path) -> dict | None:
    """``rounds_result`` of an experiment folder as it stands, e.g. one stopped after round 1 (a screened
    tuning attempt); None before its split is recorded."""
    record_path, split_path = exp / EXPERIMENT_FILE, exp / SPLIT_FILE
    if not (record_path.exists() and split_path.exists()):
        return None
    record = orjson.loads(record_path.read_bytes())
    recorded = recorded_settings(record)
    settings = RoundsSettings(**{**recorded, "pool": tuple(recorded["pool"])})
    split = PoolSplit.from_dict(orjson.loads(split_path.read_bytes()))
    return rounds_result(settings, exp, plan_rounds(settings, exp, split), dict(record.get("timings") or {}), split)


def score_model_drift(exp: Path, stages: list[Stage], split: PoolSplit, settings: RoundsSettings) -> dict[int, float]:
    """Spearman rank correlation of each round's scores with the previous round's, on a fixed probe set
    of part 0 (which no BLISS round selects from): how much the score model moved between rounds."""
    scorer_rounds = [(s.round, s.run_dir) for s in stages if s.role == "train-scorer"]
    if len(scorer_rounds) < 2:
        return {}
    import numpy as np
    import torch

    from engine.bliss.artifacts import load_score_model, score_model_path
    from engine.bliss.train import score_documents
    from engine.data.sources import discover_shards
    from engine.data.stream import tokenised_documents
    from engine.data.tokenizer import load_tokenizer, prefix_encoder

    first = RunDir(scorer_rounds[0][1])
    tokenizer = load_tokenizer(first.tokenizer_path)
    probe = tokenised_documents(discover_shards(part_inputs(exp, split, 0)),
                                prefix_encoder(tokenizer, settings.scorer_seq_len), limit=PROBE_DOCUMENTS)
    scores = {}
    for r, root in scorer_rounds:
        model, meta = load_score_model(score_model_path(RunDir(root)))
        scores[r] = score_documents(model, probe, int(meta["pad_id"]), torch.device("cpu"))

    def ranks(values):
        return np.argsort(np.argsort(values, kind="stable"), kind="stable").astype(np.float64)

    drift = {}
    for (prev, _), (r, _) in zip(scorer_rounds, scorer_rounds[1:], strict=False):
        a, b = ranks(scores[prev]), ranks(scores[r])
        drift[r] = round(float(np.corrcoef(a, b)[0, 1]), 4) if len(a) > 1 else None
    return drift


def markdown_report(result: dict) -> str:
    from engine.eval.compare import markdown_table

    header = ["round", "scorer", "docs kept", "tokens kept", "threshold", "val loss (decayed)", "val loss (main)",
              "tokens trained", "drift ρ", "selection CPU-s", "pretrain CPU-s"]
    rows = [[row["round"], row["scorer"], row["documents_kept"], row["tokens_kept"], row["threshold"], row["val_loss"],
             row["val_loss_main"], row["tokens"], row["drift_spearman"], row["selection_cpu_s"], row["pretrain_cpu_s"]]
            for row in result["rounds"]]
    if any(row.get("selection_gpu_s") or row.get("pretrain_gpu_s") for row in result["rounds"]):
        header += ["selection GPU-s", "pretrain GPU-s"]
        for cells, row in zip(rows, result["rounds"], strict=True):
            cells += [row["selection_gpu_s"], row["pretrain_gpu_s"]]
    lines = [f"# rounds: {result['name']}", "", f"Split: {result['split']['mode']}.", "",
             markdown_table(header, rows), ""]
    for row in result["rounds"]:
        top = ", ".join(f"{source} {share:.1%}" for source, share in list(row["composition"].items())[:5])
        lines.append(f"- round {row['round']} composition: {top or 'no source field'}")
    return "\n".join(lines) + "\n"
