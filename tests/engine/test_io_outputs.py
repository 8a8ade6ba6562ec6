"""``select --output-format``: parquet with every input column, and the Megatron/GPT-NeoX indexed dataset,
read back with a reader written here from the format's specification; ``pretrain`` trains on it."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tokenizers import Tokenizer

from engine.errors import UserError
from engine.run_dir import STAGE_OUTPUTS, RunDir
from engine.select.config import SelectConfig
from engine.select.stage import run_select
from tests.conftest import PYTHIA_TOKENIZER, make_records, write_shard


def select(root: Path, name: str, inputs, tokenizer, **overrides) -> tuple[dict, RunDir]:
    settings = {"workers": 0, "budget": "40%", **overrides}
    config = SelectConfig(inputs=tuple(str(p) for p in inputs), tokenizer=str(tokenizer), runs_dir=str(root), **settings)
    run_dir = RunDir.named(name, root)
    return run_select(config, run_dir), run_dir


def jsonl_outputs(run_dir: RunDir) -> dict[str, list[dict]]:
    out = {}
    for path in sorted(run_dir.selected.glob("*.jsonl.zst")):
        with open(path, "rb") as f:
            out[path.name.removesuffix(".jsonl.zst")] = [orjson.loads(line) for line in
                                                         zstandard.ZstdDecompressor().stream_reader(f).read().splitlines()]
    return out


def parquet_outputs(run_dir: RunDir) -> dict[str, list[dict]]:
    return {p.name.removesuffix(".parquet"): pq.read_table(p).to_pylist() for p in sorted(run_dir.selected.glob("*.parquet"))}


@pytest.fixture
def uneven_pool(tmp_path) -> list[Path]:
    """JSONL whose records do not all have the same fields, one of them holding mixed types."""
    first = make_records(120, seed=41)
    for i, record in enumerate(first):
        if i % 4 == 0:
            record["meta"] = {"lang": "en", "score": i / 10}
        if i % 5 == 0:
            record["n"] = i if i % 2 else f"#{i}"  # a number here, a string there
    return [write_shard(tmp_path / "pool" / "a.jsonl.zst", first),
            write_shard(tmp_path / "pool" / "b.json.gz", make_records(120, seed=42))]


def test_parquet_output_of_jsonl_holds_every_field_of_the_kept_records(tmp_path, uneven_pool, small_tokenizer):
    _, as_jsonl = select(tmp_path / "runs", "j", uneven_pool, small_tokenizer)
    manifest, as_parquet = select(tmp_path / "runs", "p", uneven_pool, small_tokenizer, output_format="parquet")
    assert manifest["output_format"] == "parquet" and manifest["outputs"] == ["a.parquet", "b.parquet"]
    expected, got = jsonl_outputs(as_jsonl), parquet_outputs(as_parquet)
    assert list(got) == list(expected) == ["a", "b"]
    for name, records in expected.items():
        assert len(got[name]) == len(records) > 0
        for want, row in zip(records, got[name], strict=True):
            # every field of every record is a column; a field a record lacks is null there
            assert {k: v for k, v in row.items() if v is not None} == {
                k: (orjson.dumps(v).decode() if k == "n" else v) for k, v in want.items()}
    schema = pq.read_schema(as_parquet.selected / "a.parquet")
    assert schema.names == ["text", "timestamp", "url", "source", "meta", "n"]
    assert str(schema.field("n").type) == "string"  # mixed types: each value's JSON text


def test_parquet_output_of_parquet_keeps_its_schema_and_rows(tmp_path, small_tokenizer):
    pool = []
    for i in range(2):  # types that inferring a schema from the values would not give back
        records = make_records(200, seed=50 + i)
        table = pa.table({"text": [r["text"] for r in records], "id": pa.array(range(200), pa.int16()),
                          "quality": pa.array(np.linspace(0, 1, 200), pa.float32())})
        pool.append(tmp_path / "pool" / f"s{i}.parquet")
        pool[-1].parent.mkdir(exist_ok=True)
        pq.write_table(table, pool[-1], row_group_size=32)
    _, as_jsonl = select(tmp_path / "runs", "j", pool, small_tokenizer)
    manifest, as_parquet = select(tmp_path / "runs", "p", pool, small_tokenizer, output_format="parquet")
    assert parquet_outputs(as_parquet) == jsonl_outputs(as_jsonl)  # the same rows, every column, in file order
    assert sum(len(v) for v in parquet_outputs(as_parquet).values()) == manifest["documents"]["kept"]
    for source in pool:
        written = pq.read_schema(as_parquet.selected / source.name)
        assert written.equals(pq.read_schema(source), check_metadata=False)


# --- Megatron / GPT-NeoX -------------------------------------------------------------------------------
# An independent reader, from the format's description (Megatron-LM / GPT-NeoX ``MMapIndexedDataset``):
# .idx = magic b"MMIDIDX\x00\x00", <Q version (1), <B dtype code, <Q number of sequences, <Q number of
# doc_idx entries, then int32 sizes, int64 byte pointers, int64 doc_idx; .bin = the tokens back to back.

SPEC_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
               8: np.uint16}


def read_megatron(prefix: Path) -> tuple[dict, list[np.ndarray]]:
    index = Path(str(prefix) + ".idx").read_bytes()
    assert index[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack("<Q", index[9:17])
    code, = struct.unpack("<B", index[17:18])
    count, doc_count = struct.unpack("<QQ", index[18:34])
    at = 34
    sizes = np.frombuffer(index, np.int32, count, at)
    pointers = np.frombuffer(index, np.int64, count, at + 4 * count)
    doc_idx = np.frombuffer(index, np.int64, doc_count, at + 12 * count)
    assert len(index) == at + 12 * count + 8 * doc_count
    data = Path(str(prefix) + ".bin").read_bytes()
    dtype = np.dtype(SPEC_DTYPES[code])
    documents = [np.frombuffer(data, dtype, int(size), int(pointer)) for size, pointer in zip(sizes, pointers, strict=True)]
    header = {"version": version, "code": code, "count": count, "doc_idx": doc_idx.tolist(), "bin_bytes": len(data)}
    return header, documents


def test_megatron_output_is_the_tokenised_subset_read_back_from_the_spec(tmp_path, corpus, small_tokenizer):
    _, as_jsonl = select(tmp_path / "runs", "j", corpus, small_tokenizer, budget="30%")
    manifest, as_megatron = select(tmp_path / "runs", "m", corpus, small_tokenizer, budget="30%",
                                   output_format="megatron", workers=2)
    header, documents = read_megatron(as_megatron.selected / "subset_text_document")
    tokenizer = Tokenizer.from_file(str(small_tokenizer))
    eod = tokenizer.token_to_id("<|endoftext|>")
    kept = [record["text"] for records in jsonl_outputs(as_jsonl).values() for record in records]
    assert header["version"] == 1 and header["code"] == 8  # uint16: the vocabulary is under 65,500
    assert header["count"] == len(kept) == manifest["documents"]["kept"]
    assert header["doc_idx"] == list(range(len(kept) + 1))
    for text, tokens in zip(kept, documents, strict=True):  # shard order, then file order, as the JSONL subset
        assert tokens.tolist() == tokenizer.encode(text, add_special_tokens=False).ids + [eod]
    assert header["bin_bytes"] == 2 * sum(len(d) for d in documents)
    assert manifest["outputs"] == ["subset_text_document.bin", "subset_text_document.idx"]
    assert manifest["megatron"]["tokens"] == sum(len(d) for d in documents) and manifest["megatron"]["eod_id"] == eod
    assert not (as_megatron.selected / "parts").exists()  # the per-shard parts are joined and gone
    assert {e["output"] for e in manifest["inputs"] if e["kept_documents"]} == {"subset_text_document.bin"}


def test_another_output_format_on_resume_replaces_the_old_files_and_force_removes_them(tmp_path, corpus,
                                                                                      small_tokenizer):
    root = tmp_path / "runs"
    _, run = select(root, "r", corpus, small_tokenizer)
    assert len(list(run.selected.glob("*.jsonl.zst"))) == 4
    select(root, "r", corpus, small_tokenizer, output_format="parquet", resume=True)
    assert sorted(p.suffix for p in run.selected.iterdir()) == [".json"] + [".parquet"] * 4
    select(root, "r", corpus, small_tokenizer, output_format="megatron", resume=True)
    assert sorted(p.name for p in run.selected.iterdir()) == ["manifest.json", "subset_text_document.bin",
                                                              "subset_text_document.idx"]
    run.discard(STAGE_OUTPUTS["select"])  # what --force removes
    assert not run.selected.exists()
    with pytest.raises(UserError, match="--output-format 'csv': choose one of jsonl.zst, parquet, megatron"):
        SelectConfig(output_format="csv")


def pretrain_config(tmp_path, data: str, **flags):
    from engine.pretrain.launch import resolve_config

    run = RunDir(tmp_path / "pretrain")
    base = {"data": (data,), "size": "tiny", "seq_len": 32, "global_batch_tokens": 256, "micro_batch": 4,
            "steps": 2, "log_every": 1, "save_every": 100, "eval_every": 100, "device": "cpu", **flags}
    return resolve_config(base, run, resume=False), run


def test_pretrain_trains_on_the_megatron_output_as_on_the_same_subset_in_jsonl(tmp_path, corpus, small_tokenizer):
    from engine.pretrain.launch import prepare_data
    from engine.pretrain.train import train

    _, as_jsonl = select(tmp_path / "runs", "j", corpus, small_tokenizer)
    _, as_megatron = select(tmp_path / "runs", "m", corpus, small_tokenizer, output_format="megatron")
    runs = {}
    for name, data in (("jsonl", as_jsonl.selected), ("megatron", as_megatron.selected),
                       ("prefix", as_megatron.selected / "subset_text_document")):
        config, run = pretrain_config(tmp_path / name, str(data))  # no --tokenizer: the select run's
        runs[name] = (config, prepare_data(config, run, workers=1)[0].tokens.tolist())
    assert not (tmp_path / "megatron" / "pretrain" / "data" / "train.bin").exists()  # read in place, not copied
    # the same tokens (documents, end-of-text between them) and so the same training, step for step
    assert runs["megatron"][1] == runs["jsonl"][1] == runs["prefix"][1]
    assert train(runs["megatron"][0], quiet=True).losses == train(runs["jsonl"][0], quiet=True).losses


def test_pretrain_refuses_a_megatron_dataset_of_another_tokenizer_in_one_line(tmp_path, corpus, small_tokenizer):
    from engine.pretrain.launch import prepare_data

    _, as_megatron = select(tmp_path / "runs", "m", corpus, small_tokenizer, output_format="megatron")
    config, run = pretrain_config(tmp_path / "a", str(as_megatron.selected), tokenizer=str(PYTHIA_TOKENIZER))
    with pytest.raises(UserError, match="tokenised with another tokenizer than this run's"):
        prepare_data(config, run, workers=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for suffix in (".bin", ".idx"):
        (foreign / f"data{suffix}").write_bytes((as_megatron.selected / f"subset_text_document{suffix}").read_bytes())
    config, run = pretrain_config(tmp_path / "b", str(foreign / "data"))
    with pytest.raises(UserError, match="is a Megatron dataset: name the tokenizer it was made with"):
        prepare_data(config, run, workers=1)
    (foreign / "data.idx").write_bytes((foreign / "data.idx").read_bytes()[:-8])
    config, run = pretrain_config(tmp_path / "c", str(foreign / "data.bin"), tokenizer=str(small_tokenizer))
    with pytest.raises(UserError, match="data.idx: .* bytes, its header says .* \\(cut short\\?\\)"):
        prepare_data(config, run, workers=1)
