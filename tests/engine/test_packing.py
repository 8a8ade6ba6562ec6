"""Tokenising and packing documents into the memory-mapped token file pretraining reads."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from tokenizers import Tokenizer

from engine.data.packing import open_packed, pack_split, token_dtype, tokenize_text_stream
from engine.data.tokenizer import end_of_text_id
from engine.errors import UserError
from tests.conftest import make_records, write_shard


def test_documents_are_packed_back_to_back_with_end_of_text_between(tmp_path, small_tokenizer):
    records = make_records(40, seed=5)
    bad = [b"{not json", b"", orjson.dumps({"url": "no text"})]
    write_shard(tmp_path / "in" / "a.jsonl.zst", records[:20] + bad, frames=2)
    write_shard(tmp_path / "in" / "b.jsonl", records[20:])
    packed = pack_split(str(tmp_path / "in"), tmp_path / "data", "train", small_tokenizer, workers=2)

    tok = Tokenizer.from_file(str(small_tokenizer))
    eot = end_of_text_id(tok)
    expected = []
    for r in records:
        expected += tok.encode(r["text"], add_special_tokens=False).ids + [eot]
    assert packed.tokens.dtype == np.uint16  # a 1k vocabulary fits in two bytes a token
    assert packed.tokens.tolist() == expected  # shard order, document order, one separator each
    header = packed.header
    assert header["n_documents"] == 40
    assert header["n_bytes"] == sum(len(r["text"].encode()) for r in records)
    assert header["skipped"]["malformed_json"] == 1 and header["skipped"]["missing_text"] == 1
    assert not (tmp_path / "data" / "parts").exists()  # per-shard parts are cleaned up once joined


def test_packing_is_reused_when_inputs_are_unchanged_and_redone_when_they_change(tmp_path, small_tokenizer):
    shard = write_shard(tmp_path / "in" / "a.jsonl", make_records(10, seed=1))
    first = pack_split(str(shard), tmp_path / "data", "train", small_tokenizer, workers=1)
    stamp = (tmp_path / "data" / "train.bin").stat().st_mtime_ns
    again = pack_split(str(shard), tmp_path / "data", "train", small_tokenizer, workers=1)
    assert (tmp_path / "data" / "train.bin").stat().st_mtime_ns == stamp  # not re-tokenised
    assert again.n_tokens == first.n_tokens

    write_shard(shard, make_records(30, seed=1))
    changed = pack_split(str(shard), tmp_path / "data", "train", small_tokenizer, workers=1)
    assert changed.header["n_documents"] == 30


def test_training_windows_overlap_by_one_token_so_targets_are_shifted_inputs(tmp_path, small_tokenizer):
    shard = write_shard(tmp_path / "a.jsonl", make_records(30, seed=2))
    packed = pack_split(str(shard), tmp_path / "data", "train", small_tokenizer, workers=1)
    seq_len = 16
    assert packed.n_sequences(seq_len) == (packed.n_tokens - 1) // seq_len
    first, second = packed.sequence(0, seq_len), packed.sequence(1, seq_len)
    assert len(first) == seq_len + 1
    assert first[-1] == second[0]
    reopened = open_packed(tmp_path / "data", "train")
    assert np.array_equal(reopened.tokens, packed.tokens)


def test_validation_split_starts_with_end_of_text_so_every_document_token_is_predicted(tmp_path, small_tokenizer):
    shard = write_shard(tmp_path / "val.jsonl", make_records(5, seed=3))
    packed = pack_split(str(shard), tmp_path / "data", "val", small_tokenizer, workers=1, leading_eot=True)
    tok = Tokenizer.from_file(str(small_tokenizer))
    texts = [r["text"] for r in make_records(5, seed=3)]
    ids, n_bytes = tokenize_text_stream(texts, tok, leading_eot=True)
    assert packed.tokens[0] == end_of_text_id(tok)
    assert packed.tokens.tolist() == ids.tolist()  # the eval command tokenises the same way in-process
    assert packed.header["n_bytes"] == n_bytes


def test_large_vocabularies_use_four_bytes_a_token():
    assert token_dtype(50_304) == np.uint16
    assert token_dtype(100_000) == np.uint32


def test_empty_input_is_a_one_line_error(tmp_path, small_tokenizer):
    shard = write_shard(tmp_path / "empty.jsonl", [b"", b"{}"])
    with pytest.raises(UserError, match="no text to train on"):
        pack_split(str(shard), tmp_path / "data", "train", small_tokenizer, workers=1)
