"""``blissctl export`` as a user runs it, and ``pretrain --export-hf``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from blissctl.cli import app
from tests.conftest import make_records, write_shard

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def same_logits(hf_dir: Path, run: Path) -> bool:
    from transformers import AutoModelForCausalLM

    from engine.models.checkpoints import load_pretrained_model

    ours, _ = load_pretrained_model(run)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    ids = torch.arange(40).reshape(2, 20) % 500
    with torch.no_grad():
        return torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_export_is_a_command_with_an_example():
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "--out" in result.output
    assert "export" in runner.invoke(app, ["--help"]).output


def test_pretrain_export_hf_writes_a_loadable_model_into_the_run(tmp_path, small_tokenizer):
    shard = write_shard(tmp_path / "train.jsonl.zst", make_records(200, seed=5))
    done = subprocess.run(
        [sys.executable, "-m", "blissctl", "pretrain", "--data", str(shard), "--tokenizer", str(small_tokenizer),
         "--size", "tiny", "--seq-len", "32", "--global-batch-tokens", "256", "--steps", "2", "--device", "cpu",
         "--runs-dir", str(tmp_path), "--run", "r", "--workers", "1", "--export-hf"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Hugging Face model" in done.stdout
    assert same_logits(tmp_path / "r" / "hf", tmp_path / "r")
    again = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "r"), "--out", str(tmp_path / "elsewhere")])
    assert again.exit_code == 0, again.output
    assert same_logits(tmp_path / "elsewhere", tmp_path / "r")
