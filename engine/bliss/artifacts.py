"""What ``train-scorer`` leaves in its run, and the one place that knows those files.

``runs/<name>/checkpoints/`` holds

- ``proxy-warmup.pt``       the proxy right after its warm-up on random data (the perplexity scorer's
                            model; rounds reset the proxy to it)
- ``score-model.pt``        the score model ``select --scorer bliss`` loads
- ``train-scorer-state.pt`` everything ``--resume`` needs: both models, both optimisers, the data
                            position, the RNG states

Each is a dict with a ``format`` tag, written atomically and read with ``weights_only=True``
(``engine.models.torch_files``): a file a user was handed is data, never code. ``find_*`` turn what a
user types (a run name, a run folder, a file) into the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.bliss.score_model import ScoreModel
from engine.errors import UserError
from engine.models.families import build_causal_lm
from engine.models.presets import model_preset, with_max_seq_len
from engine.models.torch_files import load_torch_file, load_weights, save_torch_file
from engine.run_dir import RunDir

SCORE_MODEL_FILE = "score-model.pt"
PROXY_WARMUP_FILE = "proxy-warmup.pt"
TRAINER_STATE_FILE = "train-scorer-state.pt"
SCORE_MODEL_FORMAT = "blissctl.score-model/1"
PROXY_FORMAT = "blissctl.proxy/1"
TRAINER_STATE_FORMAT = "blissctl.train-scorer-state/1"


def score_model_path(run_dir: RunDir) -> Path:
    return run_dir.checkpoints / SCORE_MODEL_FILE


def proxy_warmup_path(run_dir: RunDir) -> Path:
    return run_dir.checkpoints / PROXY_WARMUP_FILE


def trainer_state_path(run_dir: RunDir) -> Path:
    return run_dir.checkpoints / TRAINER_STATE_FILE


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _tagged(path: Path, payload: Any, expected: str, what: str) -> dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("format") != expected:
        raise UserError(f"{path} is not a blissctl {what} (expected format {expected})")
    return payload


# --- the score model ------------------------------------------------------------------------------


def save_score_model(path: Path, model: ScoreModel, *, preset: str, vocab_size: int, seq_len: int,
                     pad_id: int, extra: dict[str, Any] | None = None) -> None:
    """Write the score model artifact atomically (what ``select --scorer bliss`` loads)."""
    save_torch_file(path, {
        "format": SCORE_MODEL_FORMAT, "preset": preset, "vocab_size": vocab_size, "seq_len": seq_len,
        "pad_id": pad_id, "state_dict": _cpu_state(model), **(extra or {}),
    })


def load_score_model(path: Path, *, device: str = "cpu") -> tuple[ScoreModel, dict[str, Any]]:
    """The score model stored at ``path`` (in eval mode, on ``device``) and its metadata."""
    path = Path(path)
    payload = _tagged(path, load_torch_file(path, what="score model"), SCORE_MODEL_FORMAT, "score model")
    config = with_max_seq_len(model_preset(payload["preset"]), int(payload["seq_len"]))
    model = ScoreModel.build(config, int(payload["vocab_size"]))
    load_weights(model, payload.pop("state_dict"), path=path, what="score model")
    model.eval().to(device)
    return model, payload


def find_score_model(source: str, runs_dir: Path | str, *, flag: str = "--scorer-run") -> Path:
    """The score model file named by ``source``: a checkpoint file, a run folder, or a run name."""
    path = Path(source)
    if path.is_file():
        return path
    for run in ([path] if path.is_dir() else []) + [Path(runs_dir) / source]:
        for candidate in (run / "checkpoints" / SCORE_MODEL_FILE, run / SCORE_MODEL_FILE):
            if candidate.is_file():
                return candidate
        if run.is_dir():
            raise UserError(f"run {run} has no score model yet; train one with: blissctl train-scorer --run {run.name}")
    raise UserError(f"{flag} {source}: no such run in {runs_dir} and no such score model file")


# --- the warmed-up proxy ---------------------------------------------------------------------------


def save_proxy_warmup(path: Path, proxy: torch.nn.Module, *, preset: str, vocab_size: int, seq_len: int,
                      warmup_steps: int) -> None:
    save_torch_file(path, {
        "format": PROXY_FORMAT, "preset": preset, "vocab_size": vocab_size, "seq_len": seq_len,
        "model": _cpu_state(proxy), "warmup_steps": warmup_steps,
    })


def load_proxy_warmup(path: Path, *, seq_len: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The warmed-up proxy (a causal LM, CPU, eval mode) and its metadata; ``seq_len`` widens its
    positions if the caller scores longer pieces than it was trained on."""
    path = Path(path)
    payload = _tagged(path, load_torch_file(path, what="proxy checkpoint"), PROXY_FORMAT, "proxy checkpoint")
    seq_len = seq_len or int(payload["seq_len"])
    model = build_causal_lm(with_max_seq_len(model_preset(payload["preset"]), seq_len), int(payload["vocab_size"]))
    load_weights(model, payload.pop("model"), path=path, what="proxy checkpoint")
    return model.eval(), payload


def find_proxy_warmup(source: str | Path, runs_dir: Path | str = "runs") -> Path:
    """The warmed-up proxy of a train-scorer run: a checkpoint file, a run folder, or a run name."""
    path = Path(source)
    if path.is_file():
        return path
    for run in ([path] if path.is_dir() else []) + [Path(runs_dir) / str(source)]:
        candidate = run / "checkpoints" / PROXY_WARMUP_FILE
        if candidate.is_file():
            return candidate
    raise UserError(f"{source}: no warmed-up proxy ({PROXY_WARMUP_FILE}) found; run blissctl train-scorer first")


# --- a proxy or score model to start from (``train-scorer --proxy-init / --score-init``) ----------------


@dataclass(frozen=True)
class ProxyInit:
    """Where ``--proxy-init`` points: a pretrain checkpoint folder or a train-scorer ``proxy-warmup.pt``."""

    path: Path
    preset: str
    tokenizer: Path
    kind: str
    """``pretrain`` or ``warmup``."""

    def weights(self) -> dict[str, torch.Tensor]:
        if self.kind == "pretrain":
            return load_torch_file(self.path / "model.pt", what="--proxy-init model")
        payload = _tagged(self.path, load_torch_file(self.path, what="--proxy-init proxy"), PROXY_FORMAT,
                          "proxy checkpoint")
        return payload["model"]


def find_proxy_init(source: str, runs_dir: Path | str) -> ProxyInit:
    """``--proxy-init``: a pretrain checkpoint or run (its latest checkpoint: e.g. BLISS's round-0 model),
    a train-scorer run (its warmed-up proxy), or a ``proxy-warmup.pt`` file; a run name is looked up in
    ``runs_dir``."""
    from engine.models.checkpoints import checkpoint_tokenizer_path, read_meta, resolve_checkpoint

    candidates = [Path(source)] + ([Path(runs_dir) / source] if not Path(source).is_absolute() else [])
    for path in candidates:
        warmup = path if path.is_file() else path / "checkpoints" / PROXY_WARMUP_FILE
        if warmup.is_file():
            payload = _tagged(warmup, load_torch_file(warmup, what="--proxy-init proxy"), PROXY_FORMAT,
                              "proxy checkpoint")
            return ProxyInit(path=warmup, preset=str(payload["preset"]), tokenizer=artifact_tokenizer(warmup),
                             kind="warmup")
        if path.is_dir():
            checkpoint = resolve_checkpoint(path)
            meta = read_meta(checkpoint)
            if not isinstance(meta.get("size"), str):
                raise UserError(f"--proxy-init {source}: its checkpoint does not say which model size it is")
            return ProxyInit(path=checkpoint, preset=meta["size"], tokenizer=checkpoint_tokenizer_path(checkpoint),
                             kind="pretrain")
    raise UserError(f"--proxy-init {source}: no pretrain checkpoint, train-scorer run or proxy file there "
                    f"(nor a run of that name in {runs_dir})")


def load_score_init(path: Path, *, preset: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """``--score-init``: the weights of an earlier score model, which must be of this run's proxy preset
    and vocabulary (the score model is the proxy's backbone plus a head)."""
    payload = _tagged(path, load_torch_file(path, what="--score-init score model"), SCORE_MODEL_FORMAT,
                      "score model")
    if payload["preset"] != preset or int(payload["vocab_size"]) != vocab_size:
        raise UserError(f"--score-init {path}: a {payload['preset']} score model with {payload['vocab_size']} tokens; "
                        f"this run's proxy is {preset} with {vocab_size}")
    return payload["state_dict"]


# --- train-scorer's resume state -----------------------------------------------------------------


def save_trainer_state(path: Path, state: dict[str, Any]) -> None:
    save_torch_file(path, {"format": TRAINER_STATE_FORMAT, **state})


def load_trainer_state(path: Path) -> dict[str, Any]:
    return _tagged(path, load_torch_file(path, what="train-scorer checkpoint"), TRAINER_STATE_FORMAT,
                   "train-scorer checkpoint")


# --- the tokenizer that goes with an artifact ------------------------------------------------------


def artifact_tokenizer(artifact: Path) -> Path:
    """The tokenizer a score model or proxy was trained with: beside the file or in its run folder."""
    for candidate in (artifact.parent / "tokenizer.json", artifact.parent.parent / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    raise UserError(f"no tokenizer.json beside {artifact} or in its run folder: the model needs the "
                    "tokenizer it was trained with")
