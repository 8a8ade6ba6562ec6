"""Tokenizers: a local ``tokenizer.json``, a Hugging Face id (where the user has network), or — the
default — a byte-level BPE trained in seconds on a sample of the input and saved in the run directory,
so that a run never needs the network.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engine.errors import UserError, first_line

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"
DEFAULT_VOCAB_SIZE = 8192
TRAINING_SAMPLE_CHARS = 30_000_000
"""Characters of input text a default tokenizer is trained on: enough for a stable 8k vocabulary."""
SAMPLE_CHARS_PER_DOCUMENT = 1 << 17
"""At most this much of any one document goes into that sample: a single 50 MB line must not become
the tokenizer's whole training set (and several GB of its memory)."""
ENCODE_PIECE_CHARS = 1 << 20
"""Documents longer than this are tokenised in pieces cut at a space (``encode_long``), so one huge
document costs memory for one piece at a time, not for the whole of it at once."""


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file, a folder holding one, or a Hugging Face id."""
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception on a bad file
            raise UserError(f"cannot load tokenizer {path}: {error}") from None
    if path.suffix == ".json" or "/" not in str(spec) or str(spec).startswith((".", "/")):
        raise UserError(f"tokenizer not found: {spec} (give a tokenizer.json, a folder holding one, or a hub id)")
    return _hub_tokenizer(str(spec))


HUB_HOST = "huggingface.co"
OFFLINE_HINT = "give a local tokenizer.json instead (e.g. ../shared/tokenizers/gpt-neox-20b/tokenizer.json)"


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub answers a TCP connection within ``timeout`` seconds, name lookup included (run in
    a thread, since a hanging DNS lookup ignores socket timeouts)."""
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
            answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def _hub_tokenizer(repo: str) -> Tokenizer:
    """A hub id such as EleutherAI/pythia-160m: from the local Hugging Face cache if it is there, else
    from the hub, only where there is network. Offline it fails at once, not after a minute of retries."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "tokenizer.json")
    except Exception:  # a malformed id, or no huggingface_hub: treat as not cached
        cached = None
    if isinstance(cached, str) and Path(cached).is_file():
        return Tokenizer.from_file(cached)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"--tokenizer {repo!r} is a hub id, the hub is offline (HF_HUB_OFFLINE is set) and it is not "
                        f"in the local cache; {OFFLINE_HINT}")
    behind_proxy = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not behind_proxy and not hub_reachable():
        raise UserError(f"--tokenizer {repo!r} is a hub id, but this machine cannot reach the Hugging Face hub "
                        f"(offline?); {OFFLINE_HINT}")
    try:
        return Tokenizer.from_pretrained(repo)
    except Exception as error:
        raise UserError(f"cannot load tokenizer {repo!r} from the hub: {first_line(error)}") from None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE (GPT-2/Pythia style) trained on ``texts``; id 0 is ``<|endoftext|>``."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 512:
        raise UserError(f"--vocab-size {vocab_size} is too small; use at least 512")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PADDING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def training_sample(shards: Sequence[Path], max_chars: int = TRAINING_SAMPLE_CHARS,
                    text_field: str = "text") -> Iterator[str]:
    """Texts for a default tokenizer: an equal share of ``max_chars`` from every shard, so that the
    vocabulary reflects the whole pool rather than its first files."""
    from engine.data.sources import read_documents

    per_shard = max(1, max_chars // max(1, len(shards)))
    for path in shards:
        taken = 0
        for doc in read_documents([path], text_field=text_field):
            text = doc.text[:SAMPLE_CHARS_PER_DOCUMENT]
            yield text
            taken += len(text)
            if taken >= per_shard:
                break


def sample_for_training(texts: Iterable[str], max_chars: int = TRAINING_SAMPLE_CHARS) -> list[str]:
    sample: list[str] = []
    total = 0
    for text in texts:
        sample.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return sample


def split_long_text(text: str, max_chars: int = ENCODE_PIECE_CHARS) -> list[str]:
    """``text`` in pieces of at most about ``max_chars``, each cut just before a space that follows a
    non-space, where a byte-level BPE's pre-tokenizer splits anyway, so the pieces' tokens are the whole
    text's tokens (a text with no such space is cut where it must be)."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind(" ", start + max_chars // 2, start + max_chars)
        while cut > start and text[cut - 1].isspace():  # inside a run of spaces: cut before the run
            cut -= 1
        if cut <= start:
            cut = start + max_chars
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_long(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` (no special tokens), the long ones tokenised piece by piece."""
    short = [i for i, t in enumerate(texts) if len(t) <= ENCODE_PIECE_CHARS]
    out: list[list[int]] = [[] for _ in texts]
    # The short ones (the usual case: all of them) in one batch call, even beside one huge document.
    for i, encoding in zip(short, tokenizer.encode_batch_fast([texts[i] for i in short], add_special_tokens=False),
                           strict=True):
        out[i] = encoding.ids
    for i in sorted(set(range(len(texts))) - set(short)):
        for piece in split_long_text(texts[i]):
            out[i].extend(tokenizer.encode(piece, add_special_tokens=False).ids)
    return out


def end_of_text_id(tokenizer: Tokenizer) -> int:
    """The id placed between documents when packing (Pythia: 0)."""
    for token in (END_OF_TEXT, "</s>", "<eos>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise UserError("the tokenizer has no end-of-text token (<|endoftext|>)")


def padding_id(tokenizer: Tokenizer) -> int:
    """The id batches are padded with: ``<|padding|>`` where the tokenizer has it, else end-of-text."""
    pad_id = tokenizer.token_to_id(PADDING)
    return end_of_text_id(tokenizer) if pad_id is None else pad_id


def resolve_tokenizer(
    spec: str | Path | None,
    save_to: Path,
    training_texts: Iterable[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Tokenizer:
    """The run's tokenizer, always saved at ``save_to`` so later stages and resumes use the same one.

    ``spec`` None means: reuse ``save_to`` if it exists, else train a BPE on ``training_texts``.
    """
    if spec is None:
        if save_to.exists():
            return load_tokenizer(save_to)
        if training_texts is None:
            raise UserError("no tokenizer given and none saved in the run; pass --tokenizer")
        tokenizer = train_bpe_tokenizer(sample_for_training(training_texts), vocab_size)
    else:
        tokenizer = load_tokenizer(spec)
    from engine.run_dir import atomic_write_bytes

    atomic_write_bytes(save_to, tokenizer.to_str().encode())
    return tokenizer


def prefix_encoder(tokenizer, seq_len: int) -> Callable[[list[str]], list[np.ndarray]]:
    """Texts → int32 arrays of their first ``seq_len`` token ids."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length=seq_len)
    max_chars = seq_len * 32  # a token is rarely longer; spares tokenising whole books for 256 tokens

    def encode(texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        encodings = tok.encode_batch([t[:max_chars] for t in texts])
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    return encode
