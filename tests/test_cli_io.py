"""``blissctl select`` with users' formats, as typed: --text-field, --output-format, a parquet pool in,
a Megatron dataset out, and ``pretrain --data`` on it."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from blissctl.cli import app
from tests.conftest import make_records

runner = CliRunner()


def plain(text: str) -> str:
    """Help text without rich's colours and box drawing, joined into one line per paragraph."""
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", text))


def test_select_help_shows_the_format_flags_with_examples():
    result = runner.invoke(app, ["select", "--help"], env={"COLUMNS": "200"})
    text = plain(result.output)
    assert result.exit_code == 0
    assert "--text-field" in text and "e.g. --text-field content" in text
    assert "--output-format" in text and "jsonl.zst" in text and "megatron" in text
    assert "e.g. --output-format parquet" in text
    assert "s3://" in text and "parquet" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--output-format", "csv"], "--output-format 'csv': choose one of jsonl.zst, parquet, megatron"),
    (["--text-field", ""], "--text-field ''"),
    (["--input", "nosuchproto://bucket/x.parquet"], "cannot open this kind of URL here"),
])
def test_bad_format_flags_are_one_line_errors(tmp_path, args, message):
    result = runner.invoke(app, ["select", "--runs-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_parquet_pool_becomes_a_megatron_dataset_that_pretrain_takes(tmp_path, small_tokenizer):
    records = make_records(200, seed=61)
    pool = tmp_path / "fineweb"
    pool.mkdir()
    pq.write_table(pa.table({"content": [r["text"] for r in records], "url": [r["url"] for r in records]}),
                   pool / "000.parquet", row_group_size=50)
    result = runner.invoke(app, ["select", "--input", str(pool), "--text-field", "content", "--output-format",
                                 "megatron", "--tokenizer", str(small_tokenizer), "--workers", "0", "--runs-dir",
                                 str(tmp_path / "runs"), "--run", "fw"])
    assert result.exit_code == 0, result.output
    selected = tmp_path / "runs" / "fw" / "selected"
    assert (selected / "subset_text_document.bin").stat().st_size > 0 and (selected / "subset_text_document.idx").exists()
    result = runner.invoke(app, ["pretrain", "--data", str(selected), "--size", "tiny", "--seq-len", "32",
                                 "--steps", "2", "--runs-dir", str(tmp_path / "runs"), "--run", "p", "--dry-run"])
    assert result.exit_code == 0, result.output
    command = next(line for line in result.output.splitlines() if "engine.pretrain.worker" in line)
    assert "torchrun" not in command  # one process on one machine: the trainer starts without torchrun's agent
