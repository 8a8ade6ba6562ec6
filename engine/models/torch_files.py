"""Reading and writing ``.pt`` files: data only, never code.

Every file blissctl loads with torch (checkpoints, score models, the proxy warm-up, train-scorer's
state) may have been handed to the user by someone else, and a pickle can run any code on load. So
each load goes through ``load_torch_file``: ``weights_only=True`` always (tensors, plain Python
types, optimiser state), and whatever it refuses or cannot read is one clear line, never a traceback.
Writes are atomic (``engine.run_dir``).
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError, first_line
from engine.run_dir import atomic_write_with


def save_torch_file(path: Path, payload: Any) -> None:
    """``torch.save`` into a temporary file, then rename: a reader sees the old file or the new one."""
    atomic_write_with(Path(path), lambda tmp: torch.save(payload, tmp))


def load_torch_file(path: Path, *, what: str) -> Any:
    """The data in ``path``, loaded with ``weights_only=True``; a one-line ``UserError`` if it is
    missing, damaged, not a torch file, or holds anything but tensors and plain data (``what`` names
    the file in the message, e.g. "score model")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        code = re.search(r"GLOBAL ([\w.]+)", str(error))
        if code:
            raise UserError(f"cannot read {what} {path}: refused, the file asks to run code ({code.group(1)}); "
                            "blissctl loads tensors and plain data only") from None
        reason = re.search(r"WeightsUnpickler error: ([^\n]+)", str(error))
        raise UserError(f"cannot read {what} {path}: not a file of tensors and plain data"
                        + (f" ({reason.group(1).strip()})" if reason else "")) from None
    except Exception as error:  # truncated zip, random bytes, a file of another tool
        raise UserError(f"cannot read {what} {path}: {first_line(error)}") from None


def load_weights(model: torch.nn.Module, state: Any, *, path: Path, what: str) -> None:
    """``model.load_state_dict(state)``, with a mismatch (another model's file) as one line."""
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a {what}: it holds no state dict")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        raise UserError(f"{path}: its weights do not fit the model it describes ({first_line(error)})") from None

