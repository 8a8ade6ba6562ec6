"""Tokenizers: a local ``tokenizer.json``, a Hugging Face id (where the user has network), or — the
default — a byte-level BPE trained in seconds on a sample of the input and saved in the run directory,
so that a run never needs the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from engine.errors import UserError

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"
DEFAULT_VOCAB_SIZE = 8192
TRAINING_SAMPLE_CHARS = 30_000_000
"""Characters of input text a default tokenizer is trained on: enough for a stable 8k vocabulary."""


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
    try:  # a hub id such as EleutherAI/pythia-160m: only where the user has network
        return Tokenizer.from_pretrained(str(spec))
    except Exception as error:
        raise UserError(f"cannot load tokenizer {spec!r} from the hub: {error}") from None


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


def training_sample(shards: Sequence[Path], max_chars: int = TRAINING_SAMPLE_CHARS) -> Iterator[str]:
    """Texts for a default tokenizer: an equal share of ``max_chars`` from every shard, so that the
    vocabulary reflects the whole pool rather than its first files."""
    from engine.data.sources import read_documents

    per_shard = max(1, max_chars // max(1, len(shards)))
    for path in shards:
        taken = 0
        for doc in read_documents([path]):
            yield doc.text
            taken += len(doc.text)
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


def end_of_text_id(tokenizer: Tokenizer) -> int:
    """The id placed between documents when packing (Pythia: 0)."""
    for token in (END_OF_TEXT, "</s>", "<eos>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise UserError("the tokenizer has no end-of-text token (<|endoftext|>)")


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
