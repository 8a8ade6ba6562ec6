"""The run directory's writers: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os

import orjson
import pytest

import engine.run_dir as run_dir
from engine.run_dir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_with


def test_a_write_that_fails_half_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old and whole")

    def half_then_fail(tmp):
        tmp.write_bytes(b"new but ha")
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError):
        atomic_write_with(path, half_then_fail)
    assert path.read_bytes() == b"old and whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_bytes_and_json_writes_keep_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_json(path, {"seed": 1})

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_dir.os, "replace", no_rename)
    with pytest.raises(OSError) as failure:
        atomic_write_bytes(path, b"{\"seed\": 2}")
    assert failure.value.filename == str(path)  # the one-line message can name the file
    monkeypatch.undo()
    assert orjson.loads(path.read_bytes()) == {"seed": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_outputs_get_the_permissions_open_would_give(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_bytes(path, b"x")
    assert os.stat(path).st_mode & 0o777 == run_dir.FILE_MODE


def test_record_config_keeps_every_stages_entry(tmp_path):
    run = RunDir(tmp_path / "r")
    run.record_config("select", {"budget": "30%"}, seed=3)
    run.record_config("pretrain", {"steps": 10})
    data = run.read_config()
    assert data["select"] == {"budget": "30%", "seed": 3} and data["pretrain"] == {"steps": 10}
    run.forget_stage("select")
    assert "select" not in run.read_config() and "pretrain" in run.read_config()
