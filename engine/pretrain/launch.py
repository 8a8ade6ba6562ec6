"""The launcher side of ``blissctl pretrain``: resolve the config, prepare the data, start the trainers.

Runs in the user's process, once per node. It freezes the config into
``runs/<name>/pretrain_config.json`` so the trainer's command line stays short (and printable with
``--dry-run``), tokenises and packs the data once (worker processes, idempotent), then runs

    torchrun --standalone --nproc-per-node N -m engine.pretrain.worker --config runs/<name>/pretrain_config.json

forwarding Ctrl-C to it. Several nodes: ``--nnodes`` with ``--rdzv-endpoint HOST:PORT`` (c10d
rendezvous, ranks assigned on arrival) or additionally ``--node-rank`` (static rendezvous, fixed ranks).
One DDP process on one node (every CPU run, one GPU) needs no rendezvous, so the worker is started
directly (``python -m engine.pretrain.worker``): torchrun's agent costs about 4 s of start-up and a
process for nothing there, and the trainer computes the same either way (DDP over one rank is the
plain model). ``--torchrun`` keeps torchrun for such a run too.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from engine.errors import ReportedError, UserError
from engine.pretrain.config import PretrainConfig, fit_batch_to_processes, preset_training_defaults
from engine.run_dir import RunDir, atomic_write_json, config_to_dict
from engine.runtime import die_with_parent, thread_plan

STAGE = "pretrain"
CONFIG_NAME = "pretrain_config.json"
WORKER_MODULE = "engine.pretrain.worker"

FROZEN_ON_RESUME = ("size", "seq_len", "lr", "global_batch_tokens", "seed", "data", "tokenizer",
                    "warmup_frac", "weight_decay", "min_lr_ratio", "lr_schedule", "decay_steps", "init_from",
                    "reset_optimizer")
"""Settings a resumed run must keep: changing them would make it a different run."""


def config_path(run: RunDir) -> Path:
    return run.root / CONFIG_NAME


def read_frozen_config(path: Path) -> PretrainConfig:
    """The config a launcher wrote (what the worker reads)."""
    try:
        data = orjson.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise UserError(f"config not found: {path}") from None
    data["data"] = tuple(data["data"])
    return PretrainConfig(**data)


def write_frozen_config(run: RunDir, config: PretrainConfig) -> Path:
    path = config_path(run)
    atomic_write_json(path, config_to_dict(config))
    run.record_config("pretrain", config, seed=config.seed)
    return path


def resolve_config(flags: dict[str, Any], run: RunDir, *, resume: bool, notes: list[str] | None = None
                   ) -> PretrainConfig:
    """A ``PretrainConfig`` from the flags the user gave (``None`` = not given) and the preset.

    With ``resume`` and a frozen config in the run, the saved values are the defaults and flags that
    would change the run itself (``FROZEN_ON_RESUME``) are refused; steps, batch split, logging and
    launch settings may change. Batch settings the user did not give adapt to the number of processes
    (``fit_batch_to_processes``); what was chosen is appended to ``notes``.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    saved_path = config_path(run)
    resuming = resume and saved_path.exists()
    if resuming:
        saved = config_to_dict(read_frozen_config(saved_path))
        for key in FROZEN_ON_RESUME:
            if key in given and _normalise(given[key]) != _normalise(saved[key]):
                flag = "--" + key.replace("_frac", "").replace("_", "-")
                raise UserError(
                    f"{flag} {_show(given[key])} differs from the run being resumed ({_show(saved[key])}); "
                    "start a new --run to change it"
                )
        if "steps" in given or "tokens" in given:  # a new length replaces the old one
            saved["steps"] = saved["tokens"] = None
        merged = {**saved, **given}
    else:
        if not given.get("data"):
            raise UserError("--data is required: a select output (runs/NAME/selected) or JSONL shards")
        if given.get("init_from"):
            given.update(init_from_defaults(given))
        size = given.get("size", "160m")
        from engine.models.presets import model_preset

        preset = model_preset(size)  # one-line error for an unknown size
        seq_len = given.get("seq_len", 2048)
        merged = {**preset_training_defaults(preset.name, seq_len), **given, "size": preset.name}
    merged["data"] = tuple(merged["data"]) if merged.get("data") else ()
    merged["run_dir"] = str(run.root)
    batch = {"seq_len": merged.get("seq_len", 2048), "world_size": merged.get("world_size", 1),
             "global_batch_tokens": merged["global_batch_tokens"], "micro_batch": merged["micro_batch"]}
    # A resumed run keeps its batch split unless the user types a new --micro-batch.
    frozen = {"global_batch_tokens", "micro_batch"} if resuming else set()
    chosen = fit_batch_to_processes(batch, set(given), frozen=frozen)
    merged.update(global_batch_tokens=batch["global_batch_tokens"], micro_batch=batch["micro_batch"])
    if notes is not None:
        notes.extend(chosen)
    config = PretrainConfig(**merged)
    from engine.data.megatron import indexed_prefix
    from engine.data.sources import discover_shards

    if len(config.data) != 1 or indexed_prefix(config.data[0]) is None:  # a Megatron dataset is checked later
        discover_shards(list(config.data))  # a missing input is a one-line error now, not after minutes
    if config.val:
        discover_shards(config.val)
    return config


def init_from_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """What ``--init-from`` fixes: the checkpoint folder it resolves to (frozen, so a resume starts from
    the same weights), and the model size and sequence length it was trained with unless typed; a typed
    ``--size`` that differs is refused in one line (the weights could not fit)."""
    from engine.models.checkpoints import model_config_from_meta, read_meta, resolve_checkpoint
    from engine.models.presets import model_preset

    checkpoint = resolve_checkpoint(given["init_from"])
    meta = read_meta(checkpoint)
    size = meta.get("size")
    if not isinstance(size, str):
        raise UserError(f"--init-from {given['init_from']}: its checkpoint does not say which --size it is")
    if "size" in given and model_preset(given["size"]).name != size:
        raise UserError(f"--size {given['size']} differs from the --init-from model ({size}, {checkpoint}); "
                        "drop --size or start from a model of that size")
    if dataclasses.replace(model_config_from_meta(meta), max_seq_len=0) != dataclasses.replace(
            model_preset(size), max_seq_len=0):
        raise UserError(f"--init-from {checkpoint}: its model is not the {size} preset of this blissctl version")
    return {"init_from": str(checkpoint.resolve()), "size": size, "seq_len": given.get("seq_len", meta["seq_len"])}


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# --- tokenizer and data -----------------------------------------------------------------------------


def selected_folder_tokenizer(data: tuple[str, ...]) -> Path | None:
    """``runs/X/tokenizer.json`` when ``data`` is one ``select`` output folder (``runs/X/selected``)."""
    if len(data) != 1:
        return None
    folder = Path(data[0])
    if not folder.is_dir():  # a Megatron prefix inside a select output: runs/X/selected/subset_text_document
        from engine.data.megatron import indexed_prefix

        prefix = indexed_prefix(data[0])
        folder = Path(prefix).parent if prefix is not None else folder
    if folder.is_dir() and (folder / "manifest.json").exists():
        candidate = folder.parent / "tokenizer.json"
        if candidate.exists():
            return candidate
    return None


def resolve_run_tokenizer(config: PretrainConfig, run: RunDir) -> Path:
    """The run's tokenizer, saved at ``runs/<name>/tokenizer.json``: ``--tokenizer``, else the select
    run's, else the one already saved, else a BPE trained on the training data."""
    from engine.data.sources import discover_shards
    from engine.data.tokenizer import resolve_tokenizer, training_sample

    spec = config.tokenizer or selected_folder_tokenizer(config.data)
    if config.init_from:
        spec = init_from_tokenizer(Path(config.init_from), spec)
    if spec is None and run.tokenizer_path.exists():
        return run.tokenizer_path
    texts = None
    if spec is None:
        from engine.data.megatron import indexed_prefix

        if len(config.data) == 1 and indexed_prefix(config.data[0]) is not None:
            raise UserError(f"--data {config.data[0]} is a Megatron dataset: name the tokenizer it was made with "
                            "(--tokenizer)")
        texts = training_sample(discover_shards(list(config.data)))
    resolve_tokenizer(spec, run.tokenizer_path, texts)
    return run.tokenizer_path


def init_from_tokenizer(checkpoint: Path, wanted: str | Path | None) -> Path:
    """The tokenizer an ``--init-from`` model was trained with; one line if the data's (or
    ``--tokenizer``'s) is another, since its token ids would mean other words to the model."""
    from engine.data.tokenizer import load_tokenizer
    from engine.models.checkpoints import checkpoint_tokenizer_path

    own = checkpoint_tokenizer_path(checkpoint)
    if wanted is not None and load_tokenizer(wanted).to_str() != load_tokenizer(own).to_str():
        raise UserError(f"the tokenizer of --data/--tokenizer ({wanted}) is not the one the --init-from model was "
                        f"trained with ({own}); select the data with that model's tokenizer")
    return own


def prepare_data(config: PretrainConfig, run: RunDir, *, workers: int | None = None, progress=None):
    """Tokenise and pack ``--data`` (and ``--val``) into ``runs/<name>/data/``; returns (train, val)."""
    from engine.data.megatron import indexed_prefix
    from engine.data.packing import pack_split, use_indexed

    tokenizer_path = resolve_run_tokenizer(config, run)
    data_dir = run.root / "data"
    prefix = indexed_prefix(config.data[0]) if len(config.data) == 1 else None
    if prefix is not None:  # select --output-format megatron, or any Megatron/GPT-NeoX dataset
        train = use_indexed(prefix, data_dir, "train", tokenizer_path)
    else:
        train = pack_split(list(config.data), data_dir, "train", tokenizer_path, workers=workers,
                           on_shard_done=progress)
    val = None
    if config.val:
        val = pack_split(config.val, data_dir, "val", tokenizer_path, workers=workers, leading_eot=True)
    return train, val


def finalise_steps(config: PretrainConfig, train_tokens: int) -> PretrainConfig:
    """The config with ``steps`` resolved (from ``--tokens`` or one epoch of the packed data)."""
    return dataclasses.replace(config, steps=config.total_steps(train_tokens), tokens=None)


# --- the torchrun command -----------------------------------------------------------------------------


def torchrun_executable() -> list[str]:
    """``torchrun`` beside this Python (same environment), else ``python -m torch.distributed.run``."""
    beside = Path(sys.executable).parent / "torchrun"
    if beside.exists():
        return [str(beside)]
    return [sys.executable, "-m", "torch.distributed.run"]


def worker_arguments(config_file: Path | str, *, resume: bool = False, stop_after: int | None = None
                     ) -> list[str]:
    """``-m engine.pretrain.worker`` and its flags: the tail of the trainer's command either way."""
    args = ["-m", WORKER_MODULE, "--config", str(config_file)]
    if resume:
        args.append("--resume")
    if stop_after is not None:
        args += ["--stop-after", str(stop_after)]
    return args


def torchrun_command(config_file: Path | str, launch: LaunchConfig, *, nproc_per_node: int,
                     rdzv_id: str = "blissctl", launcher: list[str] | None = None) -> list[str]:
    """The ``torchrun`` argv that starts ``engine.pretrain.worker`` on this node (``launch`` has
    checked its flags)."""
    cmd = list(launcher or torchrun_executable())
    if launch.nnodes == 1 and launch.rdzv_endpoint is None:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        cmd += ["--nnodes", str(launch.nnodes)]
        if launch.node_rank is not None:  # fixed ranks: node 0 hosts the store at the endpoint
            cmd += ["--node-rank", str(launch.node_rank), "--rdzv-backend", "static",
                    "--rdzv-endpoint", launch.rdzv_endpoint]
        else:
            cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint, "--rdzv-id", rdzv_id]
    return cmd + ["--nproc-per-node", str(nproc_per_node),
                  *worker_arguments(config_file, resume=launch.resume, stop_after=launch.stop_after)]


def trainer_command(config_file: Path | str, launch: LaunchConfig, *, nproc_per_node: int, fsdp: bool,
                    rdzv_id: str = "blissctl") -> list[str]:
    """How this node starts its trainers: torchrun (``launch.under_torchrun``), or the one trainer as a
    plain process in this Python's environment."""
    if launch.under_torchrun(nproc_per_node=nproc_per_node, fsdp=fsdp):
        return torchrun_command(config_file, launch, nproc_per_node=nproc_per_node, rdzv_id=rdzv_id)
    return [sys.executable, *worker_arguments(config_file, resume=launch.resume, stop_after=launch.stop_after)]


def format_command(cmd: list[str]) -> str:
    return shlex.join(cmd)


def worker_environment() -> dict[str, str]:
    """This environment, with the project importable by the workers wherever they start."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding engine/
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class TorchrunReport:
    """Passes torchrun's stderr through, holding back torchrun's own report of a failure.

    When a trainer stops with one of its one-line messages (``error: …``, ``interrupted: …``), torchrun
    adds its agent's log lines and a traceback of itself (``ChildFailedError``, ``SignalException``):
    noise after the line that matters. Lines that come from torchrun's agent are held; at the end they
    are dropped if a trainer said what went wrong, and printed otherwise (a real crash keeps every line).
    The trainers' own output, tracebacks included, passes straight through.
    """

    AGENT_LOG = re.compile(r"^[EWIDC]\d{4} \d\d:\d\d:\d\d\.\d+ \d+ .*torch/distributed/")
    AGENT_FRAME = ("torch/distributed/run.py", "torch/distributed/elastic", "bin/torchrun", "torch/distributed/launcher")

    def __init__(self, out) -> None:
        self.out = out
        self.held: list[str] = []
        self.said_why = False
        self._pending_traceback: str | None = None
        self._in_agent_traceback = False

    def line(self, text: str) -> None:
        from engine.pretrain.worker import ONE_LINE_ERROR, ONE_LINE_INTERRUPT

        if self._in_agent_traceback:  # torchrun's own traceback runs to the end of its output
            self.held.append(text)
            return
        if self._pending_traceback is not None:
            first, self._pending_traceback = self._pending_traceback, None
            if any(frame in text for frame in self.AGENT_FRAME):
                self._in_agent_traceback = True
                self.held += [first, text]
                return
            self._write(first)
        if text.startswith("Traceback (most recent call last):"):
            self._pending_traceback = text  # whose traceback: its first frame tells
            return
        if self.AGENT_LOG.match(text):
            self.held.append(text)
            return
        if text.startswith((ONE_LINE_ERROR, ONE_LINE_INTERRUPT)):
            self.said_why = True
        self._write(text)

    def finish(self) -> None:
        if self._pending_traceback is not None:
            self._write(self._pending_traceback)
        if not self.said_why:
            for text in self.held:
                self._write(text)
        self.held = []

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


@dataclass(frozen=True)
class TorchrunExit:
    code: int
    explained: bool
    """A trainer said what went wrong in one line (``TorchrunReport``)."""


def run_forwarding_signals(cmd: list[str], env: dict[str, str] | None = None) -> TorchrunExit:
    """Run ``cmd`` in its own session and forward Ctrl-C / SIGTERM to it; its exit status.

    The child gets exactly one SIGINT per Ctrl-C (not a second copy from the terminal), so torchrun
    stops its workers cleanly; a second Ctrl-C sends SIGTERM and a third kills the whole group. The
    child is told to die with this process (a ``kill -9`` of ``blissctl pretrain`` takes torchrun and
    its trainers with it). Its stderr goes through ``TorchrunReport``. Raises ``KeyboardInterrupt`` after
    the child has exited if the run was interrupted.
    """
    launcher_pid = os.getpid()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True,
                            errors="replace", bufsize=1,
                            preexec_fn=lambda: die_with_parent(launcher_pid, signal.SIGTERM))
    report = TorchrunReport(sys.stderr)
    reader = threading.Thread(target=lambda: [report.line(text) for text in proc.stderr], daemon=True)
    reader.start()
    interrupts = 0

    def forward(signum, _frame):
        nonlocal interrupts
        interrupts += 1
        try:
            if interrupts == 1:
                proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
            elif interrupts == 2:
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
        reader.join(timeout=10)
        report.finish()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupts:
        raise KeyboardInterrupt
    return TorchrunExit(code=code, explained=report.said_why)


# --- the whole launch ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """How ``blissctl pretrain`` starts the trainers on this node (nothing here changes what is trained)."""

    nproc_per_node: int | None = None
    """Processes on this node; default: the GPUs, or 1 on a CPU."""
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    workers: int | None = None
    """Tokenising processes for the data preparation; default: the CPU count."""
    resume: bool = False
    stop_after: int | None = None
    dry_run: bool = False
    torchrun: bool = False
    """Start even a one-process run under torchrun (by default such a run starts its trainer directly)."""
    export_hf: bool = False
    """Write the trained model as a Hugging Face directory, ``runs/<name>/hf/``, when training ends."""

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after < 1:
            raise UserError(f"--stop-after must be at least 1, got {self.stop_after}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise UserError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise UserError(f"--nnodes must be at least 1, got {self.nnodes}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.rdzv_endpoint is not None and ":" not in self.rdzv_endpoint:
            raise UserError(f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise UserError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (the address of node 0)")

    def under_torchrun(self, *, nproc_per_node: int, fsdp: bool) -> bool:
        """Whether the trainers start under torchrun. One DDP process on one node has nothing to
        rendezvous with, so it starts directly unless ``--torchrun`` asks; FSDP keeps torchrun even
        on one process (its sharded, bf16-policy model needs the process group)."""
        alone = nproc_per_node == 1 and self.nnodes == 1 and self.rdzv_endpoint is None and not fsdp
        return self.torchrun or not alone

    @property
    def takes_the_run_lock(self) -> bool:
        """The launcher of a single node, or of node 0 of a static rendezvous, owns the run folder; with
        c10d rendezvous every node's launcher looks alike, and the trainer lock of rank 0 guards the run."""
        return self.nnodes == 1 or self.node_rank == 0


def default_nproc(device: str | None) -> int:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def describe(config: PretrainConfig) -> str:
    """One line: model, parallelism, processes, batch split, learning rate, length."""
    steps = (str(config.steps) if config.steps is not None
             else f"{config.tokens:,} tokens" if config.tokens is not None else "one epoch of --data")
    return (f"model {config.size} · {'FSDP' if config.fsdp else 'DDP'} · {config.world_size} process(es) · "
            f"seq {config.seq_len} · {config.global_batch_tokens:,} tokens/step "
            f"(micro-batch {config.micro_batch} × {config.grad_accum} accumulation) · lr {config.lr:g} "
            f"{config.lr_schedule} · steps {steps}"
            + (f" + {config.decay_steps} decay-branch steps" if config.decay_steps else "")
            + (f" · from {config.init_from}" + (" (fresh AdamW)" if config.reset_optimizer else "")
               if config.init_from else ""))


def launch_pretrain(flags: dict[str, Any], launch: LaunchConfig, run: RunDir, say: Callable[[str], None]) -> None:
    """``blissctl pretrain``: resolve the config, prepare the data once, freeze the config, start the
    trainers (``trainer_command``: torchrun, or the one trainer directly).

    ``flags`` are the training settings the user gave (``None`` = not given); ``say`` prints a line.
    """
    nproc = launch.nproc_per_node or default_nproc(flags.get("device"))
    notes: list[str] = []
    config = resolve_config({**flags, "world_size": nproc * launch.nnodes}, run, resume=launch.resume, notes=notes)
    threads = thread_plan(processes=nproc, requested=flags.get("threads"))  # before any worker of ours starts
    config = dataclasses.replace(config, threads=threads.threads)
    cmd = trainer_command(config_path(run), launch, nproc_per_node=nproc, fsdp=config.fsdp,
                          rdzv_id=f"blissctl-{run.name}")
    launcher = "torchrun" if launch.under_torchrun(nproc_per_node=nproc, fsdp=config.fsdp) else "the trainer"
    if not launch.resume and (run.checkpoints / "latest").exists():
        raise UserError(f"run {run.root} already has checkpoints; pass --resume to continue it or pick another --run")
    for note in notes:
        say(f"note: {note}")
    if launch.dry_run:
        say(describe(config))
        say(format_command(cmd))
        return

    lock = run.lock(STAGE) if launch.takes_the_run_lock else None
    try:
        say(f"preparing data for {run.root} …")
        train, val_data = prepare_data(config, run, workers=launch.workers)
        config = finalise_steps(config, train.n_tokens)
        say(f"train: {train.header['n_documents']:,} documents, {train.n_tokens:,} tokens "
            f"({train.n_sequences(config.seq_len):,} sequences of {config.seq_len})"
            + (f"; val: {val_data.n_tokens:,} tokens" if val_data is not None else ""))
        write_frozen_config(run, config)
        say(describe(config))
        say(threads.describe())
        say(format_command(cmd))
        finished = run_forwarding_signals(cmd, env=worker_environment())
        if finished.code != 0:
            if finished.explained:  # the trainer's own line said what went wrong: nothing to add
                raise ReportedError(f"{launcher} exited with status {finished.code}", code=2)
            raise UserError(f"training failed ({launcher} exited with status {finished.code}); see the messages above")
        if launch.export_hf and launch.takes_the_run_lock:
            from engine.models.export import export_hf

            # Here, in the launcher, not on the trainer ranks (no GPU memory), under the run's lock still.
            exported = export_hf(run.root, hf_export_path(run), force=True)
            say(f"Hugging Face model: {exported.path} (AutoModelForCausalLM.from_pretrained, lm-eval, vLLM)")
    finally:
        if lock is not None:
            lock.release()


def hf_export_path(run: RunDir) -> Path:
    """Where ``pretrain --export-hf`` puts the Hugging Face directory: inside the run."""
    return run.root / "hf"
