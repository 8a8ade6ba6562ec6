"""The launcher side of ``blissctl pretrain``: resolve the config, prepare the data, start ``torchrun``.

Runs in the user's process, once per node. It freezes the config into
``runs/<name>/pretrain_config.json`` so the ``torchrun`` command line stays short (and printable with
``--dry-run``), tokenises and packs the data once (worker processes, idempotent), then runs

    torchrun --standalone --nproc-per-node N -m engine.pretrain.worker --config runs/<name>/pretrain_config.json

forwarding Ctrl-C to it. Several nodes: ``--nnodes`` with ``--rdzv-endpoint HOST:PORT`` (c10d
rendezvous, ranks assigned on arrival) or additionally ``--node-rank`` (static rendezvous, fixed ranks).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from engine.errors import UserError
from engine.pretrain.train import PretrainConfig, preset_training_defaults
from engine.run_dir import RunDir, atomic_write_json, config_to_dict

CONFIG_NAME = "pretrain_config.json"
WORKER_MODULE = "engine.pretrain.worker"

FROZEN_ON_RESUME = ("size", "seq_len", "lr", "global_batch_tokens", "seed", "data", "tokenizer",
                    "warmup_frac", "weight_decay", "min_lr_ratio")
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


def resolve_config(flags: dict[str, Any], run: RunDir, *, resume: bool) -> PretrainConfig:
    """A ``PretrainConfig`` from the flags the user gave (``None`` = not given) and the preset.

    With ``resume`` and a frozen config in the run, the saved values are the defaults and flags that
    would change the run itself (``FROZEN_ON_RESUME``) are refused; steps, batch split, logging and
    launch settings may change.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    saved_path = config_path(run)
    if resume and saved_path.exists():
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
        size = given.get("size", "160m")
        from engine.models.presets import model_preset

        preset = model_preset(size)  # one-line error for an unknown size
        seq_len = given.get("seq_len", 2048)
        merged = {**preset_training_defaults(preset.name, seq_len), **given, "size": preset.name}
    merged["data"] = tuple(merged["data"]) if merged.get("data") else ()
    merged["run_dir"] = str(run.root)
    config = PretrainConfig(**merged)
    from engine.data.sources import discover_shards

    discover_shards(list(config.data))  # a missing input is a one-line error now, not after minutes
    if config.val:
        discover_shards(config.val)
    return config


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
    if spec is None and run.tokenizer_path.exists():
        return run.tokenizer_path
    texts = None
    if spec is None:
        texts = training_sample(discover_shards(list(config.data)))
    resolve_tokenizer(spec, run.tokenizer_path, texts)
    return run.tokenizer_path


def prepare_data(config: PretrainConfig, run: RunDir, *, workers: int | None = None, progress=None):
    """Tokenise and pack ``--data`` (and ``--val``) into ``runs/<name>/data/``; returns (train, val)."""
    from engine.data.packing import pack_split

    tokenizer_path = resolve_run_tokenizer(config, run)
    data_dir = run.root / "data"
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


def torchrun_command(
    config_file: Path | str,
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "blissctl",
    resume: bool = False,
    stop_after: int | None = None,
    launcher: list[str] | None = None,
) -> list[str]:
    """The ``torchrun`` argv that starts ``engine.pretrain.worker`` on this node."""
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if nnodes < 1:
        raise UserError(f"--nnodes must be at least 1, got {nnodes}")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank must be in 0..{nnodes - 1}, got {node_rank}")
    if rdzv_endpoint is not None and ":" not in rdzv_endpoint:
        raise UserError(f"--rdzv-endpoint must be HOST:PORT, got {rdzv_endpoint!r}")
    cmd = list(launcher or torchrun_executable())
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        if rdzv_endpoint is None:
            raise UserError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the address of node 0)")
        cmd += ["--nnodes", str(nnodes)]
        if node_rank is not None:  # fixed ranks: node 0 hosts the store at the endpoint
            cmd += ["--node-rank", str(node_rank), "--rdzv-backend", "static", "--rdzv-endpoint", rdzv_endpoint]
        else:
            cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
    cmd += ["--nproc-per-node", str(nproc_per_node), "-m", WORKER_MODULE, "--config", str(config_file)]
    if resume:
        cmd.append("--resume")
    if stop_after is not None:
        cmd += ["--stop-after", str(stop_after)]
    return cmd


def format_command(cmd: list[str]) -> str:
    return shlex.join(cmd)


def worker_environment() -> dict[str, str]:
    """This environment, with the project importable by the workers wherever they start."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding engine/
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_forwarding_signals(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` in its own session and forward Ctrl-C / SIGTERM to it; its exit status.

    The child gets exactly one SIGINT per Ctrl-C (not a second copy from the terminal), so torchrun
    stops its workers cleanly; a second Ctrl-C sends SIGTERM and a third kills the whole group.
    Raises ``KeyboardInterrupt`` after the child has exited if the run was interrupted.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
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
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupts:
        raise KeyboardInterrupt
    return code
