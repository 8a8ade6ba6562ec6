"""Pretraining checkpoints: one folder per step, written atomically, the last ``--keep`` kept.

``runs/<name>/checkpoints/step_000010/`` holds

- ``model.pt``      full (unsharded) model state dict, CPU tensors
- ``optimizer.pt``  full AdamW state dict
- ``state.json``    step, tokens and sequences seen (the data position), scheduler state, elapsed time
- ``rng.pt``        every rank's RNG states (torch, CUDA, numpy, python)
- ``meta.json``     the model preset and vocabulary size, so the model can be rebuilt without the run
- ``tokenizer.json`` a copy of the run's tokenizer: a checkpoint is self-contained

The folder is filled under a temporary name and renamed into place, then ``checkpoints/latest`` (a
one-line text file naming it) is replaced atomically, so a crash leaves the previous checkpoint intact.
``load_pretrained_model`` is the entry point other stages use (e.g. BLISS's ``--target``).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.errors import UserError
from engine.models.presets import ModelConfig
from engine.models.torch_files import load_torch_file, load_weights
from engine.run_dir import atomic_write_bytes

LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary ones are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The folder named by ``latest``, or the highest complete step folder if the marker is missing."""
    marker = checkpoints_dir / LATEST
    if marker.exists():
        candidate = checkpoints_dir / marker.read_text().strip()
        if (candidate / "meta.json").exists():
            return candidate
    done = [p for p in list_checkpoints(checkpoints_dir) if (p / "meta.json").exists()]
    return done[-1] if done else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints/`` folder or a run directory."""
    path = Path(path)
    if (path / "meta.json").exists() and (path / "model.pt").exists():
        return path
    for folder in (path / "checkpoints", path):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    raise UserError(f"no checkpoint in {path} (give a checkpoints/step_NNNNNN folder or a pretrain run directory)")


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint folder belongs to (``runs/<name>``), or ``None`` for a checkpoint
    folder that is not inside a run's ``checkpoints/`` (then nothing is written beside it)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


# --- RNG state ----------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- writing ------------------------------------------------------------------------------------


def write_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    model_state: dict,
    optimizer_state: dict,
    trainer_state: dict,
    rng_states: list[dict],
    meta: dict,
    tokenizer_path: Path | None,
    keep: int,
) -> Path:
    """Write one checkpoint atomically, point ``latest`` at it and prune to the last ``keep``."""
    import torch

    final = checkpoints_dir / checkpoint_name(step)
    tmp = checkpoints_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model_state, tmp / "model.pt")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / "state.json").write_bytes(orjson.dumps(trainer_state, option=orjson.OPT_INDENT_2))
    if tokenizer_path is not None and tokenizer_path.exists():
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    # meta.json last: its presence marks the folder complete even if renamed by hand.
    (tmp / "meta.json").write_bytes(orjson.dumps({"format": FORMAT_VERSION, "step": step, **meta},
                                                 option=orjson.OPT_INDENT_2))
    for child in tmp.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # the same step saved again (e.g. a resumed run that stopped where it began)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_bytes(checkpoints_dir / LATEST, f"{final.name}\n".encode())
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- reading ------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path.parent}: not a blissctl checkpoint (no {path.name})") from None
    except orjson.JSONDecodeError:
        raise UserError(f"{path}: not a blissctl checkpoint ({what} is not valid JSON)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a blissctl checkpoint ({what} is not a JSON object)")
    return data


def read_meta(checkpoint: Path) -> dict:
    meta = _read_json(checkpoint / "meta.json", "meta.json")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("vocab_size"), int):
        raise UserError(f"{checkpoint / 'meta.json'}: not a blissctl checkpoint (no model or vocab_size)")
    return meta


def read_trainer_state(checkpoint: Path) -> dict:
    return _read_json(checkpoint / "state.json", "state.json")


def model_config_from_meta(meta: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    except TypeError as error:
        raise UserError(f"not a blissctl checkpoint: its model description is incomplete ({error})") from None


def checkpoint_tokenizer_path(checkpoint: Path) -> Path:
    """The tokenizer a checkpoint was trained with: its own copy, else the run's."""
    run = run_dir_of(checkpoint)
    for candidate in (checkpoint / "tokenizer.json", *([run / "tokenizer.json"] if run is not None else [])):
        if candidate.exists():
            return candidate
    raise UserError(f"no tokenizer.json beside checkpoint {checkpoint}")


def load_training_states(checkpoint: Path) -> tuple[dict, dict, list]:
    """``(model state, optimiser state, per-rank RNG states)`` of a checkpoint, read as data only."""
    return (load_torch_file(checkpoint / "model.pt", what="checkpoint model"),
            load_torch_file(checkpoint / "optimizer.pt", what="checkpoint optimiser state"),
            load_torch_file(checkpoint / "rng.pt", what="checkpoint RNG state"))


def load_pretrained_model(checkpoint_path: str | os.PathLike, *, device: str = "cpu"):
    """``(model, tokenizer_path)`` for a pretrain checkpoint folder or run directory (latest checkpoint).

    The model is the plain ``transformers`` causal LM (GPTNeoXForCausalLM / LlamaForCausalLM) in
    float32 and eval mode, on ``device``; the tokenizer path points at the ``tokenizer.json`` it was
    trained with.
    """
    from engine.models.families import build_causal_lm

    checkpoint = resolve_checkpoint(checkpoint_path)
    meta = read_meta(checkpoint)
    model = build_causal_lm(model_config_from_meta(meta), meta["vocab_size"])
    state = load_torch_file(checkpoint / "model.pt", what="checkpoint model")
    load_weights(model, state, path=checkpoint / "model.pt", what="checkpoint model")
    model.to(device).eval()
    return model, checkpoint_tokenizer_path(checkpoint)
