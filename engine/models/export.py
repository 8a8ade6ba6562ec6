"""A pretraining checkpoint as a Hugging Face model directory, for transformers, lm-eval and vLLM.

``export_hf`` writes what ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` read, with no network:

- ``config.json``            the GPT-NeoX or LLaMA config, ``architectures``, float32, and the
                             tokenizer's bos/eos/pad ids
- ``generation_config.json`` the same special ids, for ``generate``
- ``model.safetensors``      the weights (safetensors only: a pickle can run code when loaded)
- ``tokenizer.json``, ``tokenizer_config.json``  the run's tokenizer with its special tokens named

The embedding matrix keeps its padded rows (``padded_vocab_size``: a multiple of 128, more than the
tokenizer's vocabulary, as Pythia's 50,304 for 50,277 tokens): the tokenizer never produces those ids,
and HF, lm-eval and vLLM only need the embedding to be at least as large as the vocabulary.

The folder is built under a temporary name beside the destination and renamed into place, so a reader
sees no export, the old one, or the whole new one — never a half-written folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from engine.errors import UserError
from engine.models.checkpoints import (
    load_pretrained_model,
    model_config_from_meta,
    read_meta,
    resolve_checkpoint,
)
from engine.models.families import count_parameters

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""The tokenizer class named in ``tokenizer_config.json``. transformers 5 writes its own
``TokenizersBackend``, which transformers 4 (still what many lm-eval and vLLM installs pin) cannot
resolve; ``PreTrainedTokenizerFast`` is the same tokenizer.json-backed class in both."""


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What an export wrote: enough for a CLI to say so in a line."""

    path: Path
    """The Hugging Face model directory."""
    checkpoint: Path
    """The checkpoint folder it came from (a run directory resolves to its latest checkpoint)."""
    family: str
    """``pythia`` (GPTNeoXForCausalLM) or ``llama`` (LlamaForCausalLM)."""
    architecture: str
    """The transformers class named in ``config.json``'s ``architectures``."""
    n_params: int
    """Parameters of the exported model, padded embedding rows included."""
    step: int | None
    """The optimiser step the checkpoint was saved at (``None`` if its meta does not say)."""


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> ExportResult:
    """Write the pretrain checkpoint ``checkpoint`` as a Hugging Face model directory at ``out_dir``.

    ``checkpoint`` is a ``checkpoints/step_NNNNNN`` folder or a pretrain run directory (its latest
    checkpoint). One path serves DDP and FSDP runs alike: ``save_checkpoint`` gathers a full, unsharded
    state dict on rank 0 whatever the parallelism, so every checkpoint loads into a plain model here.

    An existing non-empty ``out_dir`` is refused unless ``force``; then it is replaced whole, and only if
    it is an earlier export (it holds a ``config.json``), so a mistyped ``--out`` cannot delete a folder
    of other files. Nothing is written outside ``out_dir`` and one temporary folder beside it.
    """
    source = resolve_checkpoint(checkpoint)
    out_dir = Path(os.path.abspath(out_dir))  # normalises "." and "..", so the folder has a name and a parent
    _check_destination(out_dir, source, force=force)  # before loading: a refusal should cost nothing
    meta = read_meta(source)
    family = model_config_from_meta(meta).family
    model, tokenizer_path = load_pretrained_model(source)
    special = _special_tokens(tokenizer_path, embedding_rows=model.get_input_embeddings().weight.shape[0])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".export-tmp", dir=out_dir.parent))
    try:
        _write_model(model, staging, special)
        _write_tokenizer(tokenizer_path, staging, special, max_length=model.config.max_position_embeddings)
        _make_readable(staging)
        _check_destination(out_dir, source, force=force)  # again: the folder may have filled meanwhile
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    step = meta.get("step")
    return ExportResult(path=out_dir, checkpoint=source, family=family, architecture=type(model).__name__,
                        n_params=count_parameters(model), step=step if isinstance(step, int) else None)


# --- the destination --------------------------------------------------------------------------------


def _check_destination(out_dir: Path, source: Path, *, force: bool) -> None:
    """A one-line error for a destination an export must not replace."""
    if out_dir.is_symlink():
        raise UserError(f"--out {out_dir} is a symbolic link; give the folder itself")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if source.resolve().is_relative_to(out_dir.resolve()):
        raise UserError(f"--out {out_dir} holds the checkpoint being exported; choose another folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return  # nothing there, or an empty folder: the rename takes its place
    if not force:
        raise UserError(f"--out {out_dir} already exists and is not empty; pass --force to replace it")
    if not (out_dir / CONFIG_FILE).is_file():
        raise UserError(f"--out {out_dir} is not a model export (no {CONFIG_FILE}); refusing to replace it "
                        "even with --force, choose another folder")


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished ``staging`` folder to ``out_dir``; an old export moves aside first and is
    deleted only once the new one is in place (put back if that rename fails)."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        os.replace(staging, out_dir)  # rename(2) replaces an empty folder, or creates the name
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".replaced", dir=out_dir.parent))
    os.replace(out_dir, aside)  # replaces the empty placeholder mkdtemp made
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(aside, out_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """The modes ``open()`` and ``mkdir()`` would give: mkdtemp's folder is private (0700) and the
    safetensors writer leaves ``model.safetensors`` 0600, wrong for a model that a colleague's lm-eval or
    a vLLM server running as another user loads."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for child in folder.iterdir():
        child.chmod(0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the contents -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _SpecialTokens:
    end_of_text: str
    """bos, eos and unk at once, as in Pythia: documents were packed with it between them."""
    end_of_text_id: int
    padding: str
    padding_id: int


def _special_tokens(tokenizer_path: Path, *, embedding_rows: int) -> _SpecialTokens:
    from engine.data.tokenizer import PADDING, end_of_text_id, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.get_vocab_size() > embedding_rows:
        raise UserError(f"{tokenizer_path}: {tokenizer.get_vocab_size():,} tokens, more than the model's "
                        f"{embedding_rows:,} embedding rows; this is not the tokenizer the checkpoint was trained with")
    eot_id = end_of_text_id(tokenizer)
    eot = tokenizer.id_to_token(eot_id)
    pad_id = tokenizer.token_to_id(PADDING)
    # No padding token: pad with end-of-text. lm-eval needs some pad id to batch, and attention masks
    # hide padded positions, so which id it is does not change any score.
    if pad_id is None:
        return _SpecialTokens(end_of_text=eot, end_of_text_id=eot_id, padding=eot, padding_id=eot_id)
    return _SpecialTokens(end_of_text=eot, end_of_text_id=eot_id, padding=PADDING, padding_id=pad_id)


def _write_model(model, folder: Path, special: _SpecialTokens) -> None:
    """``config.json``, ``generation_config.json`` and safetensors weights of ``model`` in ``folder``."""
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = special.end_of_text_id
        config.pad_token_id = special.padding_id
    with _no_progress_bars():
        model.save_pretrained(folder)  # transformers 5 writes safetensors only; there is no pickle option
    if not any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):  # the contract, not trust
        raise RuntimeError(f"transformers did not write safetensors weights into {folder}")
    path = folder / CONFIG_FILE
    path.write_bytes(orjson.dumps(_for_older_readers(orjson.loads(path.read_bytes())), option=orjson.OPT_INDENT_2))


def _for_older_readers(config: dict) -> dict:
    """``config.json`` with the keys transformers 4 reads as well as those 5 writes: ``torch_dtype``
    beside ``dtype``, and the rotary settings under their old names beside ``rope_parameters``.
    transformers 5 accepts both spellings, and they are derived from one source here, so they agree."""
    config = {**config, "torch_dtype": config.get("dtype", "float32")}
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if config.get("model_type") == "gpt_neox":
            config.setdefault("rotary_emb_base", rope["rope_theta"])
    if config.get("model_type") == "gpt_neox" and "partial_rotary_factor" in rope:
        config.setdefault("rotary_pct", rope["partial_rotary_factor"])
    return config


def _write_tokenizer(tokenizer_path: Path, folder: Path, special: _SpecialTokens, *, max_length: int) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` with the special tokens named."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_path),
        bos_token=special.end_of_text, eos_token=special.end_of_text, unk_token=special.end_of_text,
        pad_token=special.padding,
        model_max_length=max_length,  # the positions the model has, rather than transformers' 1e30
        clean_up_tokenization_spaces=False,  # decode exactly as the tokenizer does ("a ." stays "a .")
    )
    tokenizer.save_pretrained(folder)
    path = folder / TOKENIZER_CONFIG_FILE
    settings = orjson.loads(path.read_bytes())
    settings["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    path.write_bytes(orjson.dumps(settings, option=orjson.OPT_INDENT_2))


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a "Writing model shards" bar on stderr; a one-line command does not want it."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
