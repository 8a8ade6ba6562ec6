"""blissctl as a hostile or careless user meets it: crafted files, odd run names, two writers, kill -9,
a full or read-only disk, absurd flags, huge documents. Each test names what a user would see.

The README's "Guarantees" section points here.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest
import torch
from typer.testing import CliRunner

from blissctl.cli import app
from tests.conftest import PYTHIA_TOKENIZER, make_records, write_shard

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def blissctl(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blissctl", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env or ENV)


def start_blissctl(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blissctl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)


def one_line(stderr: str) -> str:
    """The single line a user was promised (no traceback, nothing else)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


PROGRESS_BARS = ("scoring", "selecting", "writing")


def error_line(stderr: str) -> str:
    """The one error line after select's progress bars (which a failure mid-run has already drawn)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    others = [line for line in lines if not line.startswith(("error:", *PROGRESS_BARS))]
    assert len(errors) == 1 and not others and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def wait_for(condition, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def gone(processes: list[psutil.Process], timeout: float = 20) -> list[psutil.Process]:
    """The processes still alive after ``timeout`` (zombies count as gone: they run nothing)."""
    deadline = time.time() + timeout
    alive = processes
    while alive and time.time() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.1)
    return alive


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def selection(run: Path) -> dict[str, bytes]:
    import zstandard

    return {p.name: zstandard.ZstdDecompressor().stream_reader(p.open("rb")).read()
            for p in sorted((run / "selected").glob("*.jsonl.zst"))}


class RunsCode:
    """A pickle that, if ever unpickled, runs a shell command (creates ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, payload: dict | None = None) -> Path:
    """A torch file at ``path`` that would run code on an unsafe load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(payload or {}), "exploit": RunsCode(marker)}, path)
    return path


# ---- shared, expensive set-ups --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Four shards big enough that scoring takes a few seconds with one worker."""
    root = tmp_path_factory.mktemp("pool")
    for i in range(4):
        write_shard(root / f"part-{i}.jsonl.zst", make_records(5000, seed=40 + i))
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, small_tokenizer) -> Path:
    """A finished two-step tiny pretraining run (checkpoints at steps 1 and 2)."""
    runs = tmp_path_factory.mktemp("pretrained")
    shard = write_shard(runs / "data.jsonl.zst", make_records(300, seed=7))
    done = blissctl("pretrain", "--data", str(shard), "--tokenizer", str(small_tokenizer), "--size", "tiny",
                    "--seq-len", "32", "--global-batch-tokens", "256", "--steps", "2", "--save-every", "1",
                    "--device", "cpu", "--runs-dir", str(runs), "--run", "base", "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    return runs / "base"


def copy_run(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target)
    config = target / "pretrain_config.json"
    data = orjson.loads(config.read_bytes())
    data["run_dir"] = str(target)
    config.write_bytes(orjson.dumps(data))
    return target


# ---- 1. no code runs from a file a user was handed -------------------------------------------------


def _tiny_meta(vocab: int) -> dict:
    from engine.models.presets import pythia_tiny
    from engine.run_dir import config_to_dict

    return {"format": 1, "step": 1, "model": config_to_dict(pythia_tiny()), "vocab_size": vocab, "seq_len": 32}


@pytest.mark.parametrize("scorer", ["bliss", "perplexity"])
def test_a_crafted_scorer_file_runs_nothing(tmp_path, small_tokenizer, scorer):
    marker = tmp_path / "ran"
    folder = tmp_path / "scorer" / "checkpoints"
    name = "score-model.pt" if scorer == "bliss" else "proxy-warmup.pt"
    crafted = plant(folder / name, marker, {"format": f"blissctl.{'score-model' if scorer == 'bliss' else 'proxy'}/1"})
    shutil.copy(small_tokenizer, tmp_path / "scorer" / "tokenizer.json")
    shard = write_shard(tmp_path / "pool.jsonl", make_records(20))
    result = runner.invoke(app, ["select", "--input", str(shard), "--scorer", scorer, "--scorer-run", str(crafted),
                                 "--runs-dir", str(tmp_path / "runs"), "--run", "s", "--workers", "0"])
    assert result.exit_code == 2
    assert "refused" in one_line(result.stderr) and not marker.exists()


def test_a_crafted_target_checkpoint_runs_nothing(tmp_path, small_tokenizer):
    from tokenizers import Tokenizer

    marker = tmp_path / "ran"
    checkpoint = tmp_path / "target" / "checkpoints" / "step_000001"
    plant(checkpoint / "model.pt", marker)
    (checkpoint / "meta.json").write_bytes(orjson.dumps(_tiny_meta(Tokenizer.from_file(str(small_tokenizer)).get_vocab_size())))
    shutil.copy(small_tokenizer, checkpoint / "tokenizer.json")
    shard = write_shard(tmp_path / "pool.jsonl", make_records(40))
    result = runner.invoke(app, ["train-scorer", "--train", str(shard), "--val", str(shard), "--target", str(checkpoint),
                                 "--proxy", "tiny", "--steps", "1", "--warmup-steps", "1", "--seq-len", "16",
                                 "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--run", "t"])
    assert result.exit_code == 2
    assert "refused" in one_line(result.stderr) and not marker.exists()


def test_a_crafted_train_scorer_state_runs_nothing_on_resume(tmp_path, small_tokenizer):
    marker = tmp_path / "ran"
    plant(tmp_path / "runs" / "t" / "checkpoints" / "train-scorer-state.pt", marker,
          {"format": "blissctl.train-scorer-state/1"})
    shard = write_shard(tmp_path / "pool.jsonl", make_records(40))
    result = runner.invoke(app, ["train-scorer", "--train", str(shard), "--val", str(shard), "--proxy", "tiny",
                                 "--tokenizer", str(small_tokenizer), "--steps", "1", "--warmup-steps", "1",
                                 "--seq-len", "16", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"),
                                 "--run", "t", "--resume"])
    assert result.exit_code == 2
    assert "refused" in one_line(result.stderr) and not marker.exists()


def test_a_crafted_pretrain_checkpoint_runs_nothing_on_resume(tmp_path, pretrained):
    marker = tmp_path / "ran"
    run = copy_run(pretrained, tmp_path)
    plant(run / "checkpoints" / "step_000002" / "model.pt", marker)
    result = blissctl("pretrain", "--runs-dir", str(tmp_path), "--run", run.name, "--resume", "--steps", "3",
                      "--nproc-per-node", "1")
    assert result.returncode == 2  # through torchrun: the trainer's one line, and nothing of torchrun's own
    assert "refused" in one_line(result.stderr) and not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_every_file_of_a_pretrain_checkpoint_is_loaded_as_data_only(tmp_path, pretrained, name):
    from engine.errors import UserError
    from engine.pretrain.launch import read_frozen_config
    from engine.pretrain.train import train

    marker = tmp_path / "ran"
    run = copy_run(pretrained, tmp_path)
    plant(run / "checkpoints" / "step_000002" / name, marker)
    with pytest.raises(UserError, match="refused"):
        train(read_frozen_config(run / "pretrain_config.json"), resume=True, quiet=True)
    assert not marker.exists()


def test_a_crafted_checkpoint_given_to_eval_runs_nothing(tmp_path, pretrained):
    marker = tmp_path / "ran"
    run = copy_run(pretrained, tmp_path)
    plant(run / "checkpoints" / "step_000002" / "model.pt", marker)
    val = write_shard(tmp_path / "val.jsonl", make_records(10))
    result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--val", str(val), "--device", "cpu"])
    assert result.exit_code == 2
    assert "refused" in one_line(result.stderr) and not marker.exists()


def test_a_crafted_score_file_is_never_unpickled_on_resume(tmp_path, small_tokenizer):
    import numpy as np

    marker = tmp_path / "ran"
    shards = [write_shard(tmp_path / "pool" / f"p{i}.jsonl", make_records(50, seed=i)) for i in range(2)]
    common = ["select", "--input", str(tmp_path / "pool"), "--tokenizer", str(small_tokenizer), "--workers", "0",
              "--runs-dir", str(tmp_path / "runs"), "--run", "s"]
    assert runner.invoke(app, common).exit_code == 0
    before = selection(tmp_path / "runs" / "s")
    score_file = next((tmp_path / "runs" / "s" / "scores").glob("*.npz"))
    np.savez(open(score_file, "wb"), lines=np.zeros(1, np.uint32), meta=np.array([RunsCode(marker)], dtype=object))
    again = runner.invoke(app, [*common, "--resume"])
    assert again.exit_code == 0, again.output
    assert not marker.exists() and len(shards) == 2
    assert selection(tmp_path / "runs" / "s") == before  # the damaged shard was simply scored again


def test_no_torch_load_in_the_tree_is_unsafe():
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == []


# ---- 2. run names stay inside the runs folder; --force removes only what the run wrote ------------


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/abs", "", ".hidden", "x" * 200])
@pytest.mark.parametrize("command", ["select", "train-scorer", "pretrain"])
def test_a_run_name_is_one_safe_folder_name(tmp_path, name, command):
    runs = tmp_path / "deep" / "runs"
    runs.mkdir(parents=True)
    if name == "/abs":  # an absolute path outside the runs folder
        name = str(tmp_path / "elsewhere")
    extra = ["--data", str(write_shard(tmp_path / "d.jsonl", make_records(5))), "--dry-run"] if command == "pretrain" else []
    result = runner.invoke(app, [command, "--runs-dir", str(runs), "--run", name, *extra])
    assert result.exit_code == 2
    assert "a run name is one folder name" in one_line(result.stderr)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["deep", "runs", *(["d.jsonl"] if extra else [])])


def test_force_with_an_escaping_name_deletes_nothing(tmp_path, small_tokenizer):
    runs = tmp_path / "R"
    runs.mkdir()
    for folder in ("scores", "selected", "report"):  # a user's own folders beside the runs folder
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mine.txt").write_text("keep me")
    result = runner.invoke(app, ["select", "--runs-dir", str(runs), "--run", "..", "--force"])
    assert result.exit_code == 2
    assert all((tmp_path / folder / "mine.txt").read_text() == "keep me" for folder in ("scores", "selected", "report"))


def test_force_removes_only_what_select_wrote(tmp_path, small_tokenizer):
    shard = write_shard(tmp_path / "pool.jsonl", make_records(60))
    common = ["select", "--input", str(shard), "--tokenizer", str(small_tokenizer), "--workers", "0",
              "--runs-dir", str(tmp_path / "runs"), "--run", "s"]
    assert runner.invoke(app, common).exit_code == 0
    run = tmp_path / "runs" / "s"
    mine = [run / "selected" / "notes.txt", run / "scores" / "keep.me", run / "report" / "draft.md", run / "mine"]
    for path in mine:
        path.write_text("keep me")
    outside = tmp_path / "elsewhere.scores.npz"
    outside.write_text("keep me")
    (run / "scores" / "link.scores.npz").symlink_to(outside)
    again = runner.invoke(app, [*common, "--force", "--budget", "10%"])
    assert again.exit_code == 0, again.output
    assert all(path.read_text() == "keep me" for path in mine) and outside.read_text() == "keep me"
    manifest = orjson.loads((run / "selected" / "manifest.json").read_bytes())
    assert manifest["budget"]["spec"] == "10%"


# ---- 3. one writer per run --------------------------------------------------------------------------


def test_a_second_select_into_a_busy_run_is_refused_naming_the_holder(tmp_path, pool, small_tokenizer):
    common = ["select", "--input", str(pool), "--tokenizer", str(small_tokenizer), "--workers", "1",
              "--runs-dir", str(tmp_path / "runs"), "--run", "busy"]
    first = start_blissctl(*common, "--seed", "1")
    lock = tmp_path / "runs" / "busy" / ".lock"
    wait_for(lambda: lock.exists() and b"pid" in lock.read_bytes(), what="the first select to take the lock")
    second = blissctl(*common, "--seed", "2")
    assert second.returncode == 2
    assert f"in use by select (pid {first.pid})" in one_line(second.stderr)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    config = orjson.loads((tmp_path / "runs" / "busy" / "config.json").read_bytes())
    manifest = orjson.loads((tmp_path / "runs" / "busy" / "selected" / "manifest.json").read_bytes())
    assert config["select"]["seed"] == manifest["seed"] == 1


def _hold_lock(path: Path, stage: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from engine.run_dir import RunLock\n"
        f"RunLock(Path({str(path)!r}), {stage!r}).acquire(); print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_pretrain_refuses_a_run_another_process_is_writing(tmp_path, pretrained):
    run = copy_run(pretrained, tmp_path)
    holder = _hold_lock(run / ".lock", "pretrain")
    try:
        result = blissctl("pretrain", "--runs-dir", str(tmp_path), "--run", run.name, "--resume", "--steps", "3")
        assert result.returncode == 2
        assert f"in use by pretrain (pid {holder.pid})" in one_line(result.stderr)
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: nothing stale to clean up.
    from engine.run_dir import RunLock

    RunLock(run / ".lock", "test").acquire().release()


def test_a_second_trainer_in_the_same_run_refuses(tmp_path, pretrained, monkeypatch):
    import engine.pretrain.train as trainer
    from engine.errors import UserError
    from engine.pretrain.launch import read_frozen_config

    run = copy_run(pretrained, tmp_path)
    holder = _hold_lock(run / ".trainer.lock", "pretrain")
    monkeypatch.setattr(trainer, "TRAINER_LOCK_WAIT_S", 0.5)
    try:
        with pytest.raises(UserError, match=f"in use by pretrain \\(pid {holder.pid}\\)"):
            trainer.train(read_frozen_config(run / "pretrain_config.json"), resume=True, quiet=True)
    finally:
        holder.kill()
        holder.wait()


# ---- 4. nothing outlives a kill -9; --resume then gives the uninterrupted result ---------------------


def test_kill_9_of_select_leaves_no_process_and_resume_matches(tmp_path, pool, small_tokenizer):
    common = ["select", "--input", str(pool), "--tokenizer", str(small_tokenizer), "--workers", "2",
              "--temperature", "0.5", "--runs-dir", str(tmp_path / "runs")]
    main = start_blissctl(*common, "--run", "cut")
    scores = tmp_path / "runs" / "cut" / "scores"
    wait_for(lambda: scores.is_dir() and any(scores.glob("*.npz")), what="a first score file")
    children = psutil.Process(main.pid).children(recursive=True)
    assert len(children) >= 2  # the reader workers (and multiprocessing's resource tracker)
    assert not (tmp_path / "runs" / "cut" / "selected" / "manifest.json").exists()  # killed mid-scoring
    main.kill()
    main.wait()
    assert gone(children) == []
    resumed = blissctl(*common, "--run", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = blissctl(*common, "--run", "straight")
    assert straight.returncode == 0, straight.stderr
    assert selection(tmp_path / "runs" / "cut") == selection(tmp_path / "runs" / "straight")


@pytest.mark.parametrize("launch", [
    pytest.param((), id="trainer-alone"),
    pytest.param(("--torchrun",), id="under-torchrun", marks=pytest.mark.slow),  # the multi-process path's agent
])
def test_kill_9_of_pretrain_takes_the_trainer_with_it(tmp_path, small_tokenizer, launch):
    shard = write_shard(tmp_path / "data.jsonl.zst", make_records(400, seed=3))
    common = ["pretrain", "--data", str(shard), "--tokenizer", str(small_tokenizer), "--size", "tiny",
              "--seq-len", "32", "--global-batch-tokens", "256", "--steps", "40", "--save-every", "5",
              "--log-every", "1", "--device", "cpu", "--runs-dir", str(tmp_path), "--workers", "1", *launch]
    launcher = start_blissctl(*common, "--run", "cut")
    checkpoints = tmp_path / "cut" / "checkpoints"
    wait_for(lambda: (checkpoints / "latest").exists(), timeout=180, what="a first checkpoint")
    descendants = psutil.Process(launcher.pid).children(recursive=True)
    assert any("engine.pretrain.worker" in " ".join(p.cmdline()) for p in descendants)
    if launch:
        assert any("torchrun" in " ".join(p.cmdline()) or "torch.distributed.run" in " ".join(p.cmdline())
                   for p in descendants)
    assert not any(e["kind"] == "done" for e in events(tmp_path / "cut"))  # killed mid-training
    launcher.kill()
    launcher.wait()
    assert gone(descendants) == []
    resumed = blissctl(*common, "--run", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The uninterrupted run starts the other way (under torchrun, or alone): the same weights either way.
    other_launch = [flag for flag in common if flag != "--torchrun"] + ([] if launch else ["--torchrun"])
    straight = blissctl(*other_launch, "--run", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert ("torchrun" in straight.stdout) != bool(launch)
    a = torch.load(tmp_path / "cut" / "checkpoints" / "step_000040" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoints" / "step_000040" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_of_train_scorer_then_resume_matches(tmp_path, small_tokenizer):
    pool = write_shard(tmp_path / "pool.jsonl", make_records(400, seed=5))
    val = write_shard(tmp_path / "val.jsonl", make_records(40, seed=6))
    common = ["train-scorer", "--train", str(pool), "--val", str(val), "--tokenizer", str(small_tokenizer),
              "--proxy", "tiny", "--steps", "16", "--warmup-steps", "4", "--inner-steps", "2", "--seq-len", "24",
              "--batch-size", "4", "--val-batch-size", "4", "--probe-docs", "8", "--checkpoint-every", "2",
              "--device", "cpu", "--runs-dir", str(tmp_path)]
    process = start_blissctl(*common, "--run", "cut")
    wait_for(lambda: any(e["kind"] == "step" and e["step"] >= 3 for e in events(tmp_path / "cut")), timeout=180,
             what="a few outer steps")
    assert not any(e["kind"] == "done" for e in events(tmp_path / "cut"))  # killed mid-training
    process.kill()
    process.wait()
    resumed = blissctl(*common, "--run", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = blissctl(*common, "--run", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = torch.load(tmp_path / "cut" / "checkpoints" / "score-model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "straight" / "checkpoints" / "score-model.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


# ---- 5. a failing machine is one line, an error event, and nothing half-written ---------------------


def _fail_writes(monkeypatch, code: int, where: str) -> None:
    """Every atomic write into a path containing ``where`` fails as the OS would with ``code``."""
    import engine.run_dir as run_dir

    real = run_dir.atomic_write_with

    def failing(path, write):
        if where in str(path):
            raise OSError(code, os.strerror(code))
        return real(path, write)

    monkeypatch.setattr(run_dir, "atomic_write_with", failing)
    for module in ("engine.select.stage", "engine.select.writer", "engine.data.packing", "engine.models.torch_files"):
        monkeypatch.setattr(f"{module}.atomic_write_with", failing, raising=False)


@pytest.mark.parametrize(("code", "message"), [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_a_full_or_read_only_disk_is_one_line_and_an_error_event(tmp_path, small_tokenizer, monkeypatch, code, message):
    shards = [write_shard(tmp_path / "pool" / f"p{i}.jsonl", make_records(50, seed=i)) for i in range(3)]
    _fail_writes(monkeypatch, code, "selected")
    result = runner.invoke(app, ["select", "--input", str(tmp_path / "pool"), "--tokenizer", str(small_tokenizer),
                                 "--workers", "0", "--runs-dir", str(tmp_path / "runs"), "--run", "s"])
    assert result.exit_code == 1
    assert message in error_line(result.stderr)
    last = events(tmp_path / "runs" / "s")[-1]
    assert last["kind"] == "error" and message in last["message"]
    from engine.select.score_files import load_shard_scores

    scored = sorted((tmp_path / "runs" / "s" / "scores").glob("*.npz"))
    assert len(scored) == len(shards) and all(load_shard_scores(p) is not None for p in scored)
    assert not list((tmp_path / "runs" / "s").rglob("*.tmp"))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, small_tokenizer):
    runs = tmp_path / "small-disk"
    if not _mount_tmpfs(runs, "256k"):
        pytest.skip("needs root and mount for a small tmpfs")
    try:
        shard = write_shard(tmp_path / "pool.jsonl", make_records(3000, seed=9))
        result = blissctl("select", "--input", str(shard), "--tokenizer", str(small_tokenizer), "--workers", "0",
                          "--budget", "100%", "--runs-dir", str(runs), "--run", "s")
        assert result.returncode == 1
        assert "no space left" in error_line(result.stderr)
        assert not list(runs.rglob("*.tmp"))
        for path in (runs / "s" / "selected").glob("*.jsonl.zst"):  # whatever is there is whole
            import zstandard

            zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
    finally:
        subprocess.run(["umount", str(runs)], check=False)


def test_a_read_only_runs_folder_is_one_line(tmp_path, small_tokenizer):
    runs = tmp_path / "ro"
    if not _mount_tmpfs(runs, "1m"):
        pytest.skip("needs root and mount for a read-only tmpfs")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(runs)], check=True)
        shard = write_shard(tmp_path / "pool.jsonl", make_records(20))
        result = blissctl("select", "--input", str(shard), "--tokenizer", str(small_tokenizer), "--workers", "0",
                          "--runs-dir", str(runs), "--run", "s")
        assert result.returncode == 1
        assert "read-only" in one_line(result.stderr)
    finally:
        subprocess.run(["umount", str(runs)], check=False)


def test_a_killed_reader_worker_is_one_line_and_resume_recovers(tmp_path, pool, small_tokenizer):
    common = ["select", "--input", str(pool), "--tokenizer", str(small_tokenizer), "--workers", "1",
              "--runs-dir", str(tmp_path / "runs")]
    main = start_blissctl(*common, "--run", "cut")
    run = tmp_path / "runs" / "cut"
    wait_for(lambda: any(e["kind"] == "progress" and e["docs_seen"] > 0 for e in events(run)),
             what="scoring to start")
    workers = [p for p in psutil.Process(main.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
    assert workers
    os.kill(workers[0].pid, signal.SIGKILL)
    _, stderr = main.communicate(timeout=120)
    assert main.returncode == 2
    assert "was killed by signal 9" in error_line(stderr) and "--resume" in stderr
    assert events(run)[-1]["kind"] == "error"
    assert blissctl(*common, "--run", "cut", "--resume").returncode == 0
    assert blissctl(*common, "--run", "straight").returncode == 0
    assert selection(run) == selection(tmp_path / "runs" / "straight")


@pytest.mark.parametrize("command", ["select", "train-scorer", "pretrain", "demo"])
def test_a_seed_too_large_for_64_bits_is_one_line_and_writes_nothing(tmp_path, command):
    extra = ["--data", str(write_shard(tmp_path / "d.jsonl", make_records(5)))] if command == "pretrain" else []
    result = runner.invoke(app, [command, "--runs-dir", str(tmp_path / "runs"), "--seed", str(2**64), *extra])
    assert result.exit_code == 2
    assert "--seed" in one_line(result.stderr)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04 truncated zip"])
def test_a_foreign_checkpoint_is_one_line_for_eval_and_target(tmp_path, pretrained, content):
    run = copy_run(pretrained, tmp_path)
    (run / "checkpoints" / "step_000002" / "model.pt").write_bytes(content)
    shard = write_shard(tmp_path / "pool.jsonl", make_records(40))
    result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--val", str(shard), "--device", "cpu"])
    assert result.exit_code == 2 and "cannot read" in one_line(result.stderr)
    target = runner.invoke(app, ["train-scorer", "--train", str(shard), "--val", str(shard), "--target", str(run),
                                 "--proxy", "tiny", "--steps", "1", "--warmup-steps", "1", "--seq-len", "16",
                                 "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--run", "t"])
    assert target.exit_code == 2 and "cannot read" in one_line(target.stderr)


# ---- 6. one huge document costs bounded memory -------------------------------------------------------


def _peak_rss_mb(args: list[str]) -> tuple[int, float, str]:
    """Exit status, peak RSS (MB) of the largest process of ``blissctl ARGS``'s tree, and its stderr."""
    probe = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run([sys.executable, '-m', 'blissctl', *sys.argv[1:]], capture_output=True, text=True)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        "sys.stderr.write(done.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=600)
    code, peak = done.stdout.split()
    return int(code), float(peak), done.stderr


def test_one_50_mb_document_does_not_blow_up_select(tmp_path):
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 700_000)[: 50 << 20]
    records = make_records(200, seed=1) + [{"text": words}] + make_records(200, seed=2)
    shard = write_shard(tmp_path / "pool.jsonl.zst", records)
    code, peak, stderr = _peak_rss_mb(["select", "--input", str(shard), "--workers", "0", "--runs-dir",
                                       str(tmp_path / "runs"), "--run", "huge", "--vocab-size", "1024",
                                       "--unit", "docs", "--budget", "50%"])
    assert code == 0, stderr[-3000:]
    assert peak < 600, f"peak RSS {peak:.0f} MB"  # 4.9 GB before documents were capped
    manifest = orjson.loads((tmp_path / "runs" / "huge" / "selected" / "manifest.json").read_bytes())
    assert manifest["documents"]["seen"] == 401


# ---- 7. small things that surprised users ------------------------------------------------------------


def test_a_budget_too_small_for_any_document_says_so(tmp_path, small_tokenizer):
    shard = write_shard(tmp_path / "pool.jsonl", make_records(50))
    result = runner.invoke(app, ["select", "--input", str(shard), "--tokenizer", str(small_tokenizer), "--workers",
                                 "0", "--budget", "0.0001%", "--runs-dir", str(tmp_path), "--run", "tiny"])
    assert result.exit_code == 2
    assert "keeps no document" in error_line(result.stderr)
    assert any((tmp_path / "tiny" / "scores").glob("*.npz"))  # the scores stay, for a --resume with more budget


def test_a_fraction_of_a_document_is_refused(tmp_path):
    result = runner.invoke(app, ["select", "--runs-dir", str(tmp_path), "--unit", "docs", "--budget", "10.5"])
    assert result.exit_code == 2 and "whole number" in one_line(result.stderr)


def test_a_hub_tokenizer_offline_fails_at_once(tmp_path):
    shard = write_shard(tmp_path / "pool.jsonl", make_records(20))
    started = time.perf_counter()
    result = blissctl("select", "--input", str(shard), "--tokenizer", "EleutherAI/pythia-160m", "--workers", "0",
                      "--runs-dir", str(tmp_path), env={**ENV, "HF_HUB_OFFLINE": "1"})
    assert time.perf_counter() - started < 20
    assert result.returncode == 2 and "offline" in one_line(result.stderr)


def test_a_hub_tokenizer_without_network_fails_at_once(monkeypatch):
    import engine.data.tokenizer as tokenizer
    from engine.errors import UserError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(tokenizer, "hub_reachable", lambda timeout=2.0: False)
    started = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub"):
        tokenizer.load_tokenizer("EleutherAI/pythia-160m")
    assert time.perf_counter() - started < 1


def _event_log(path: Path, megabytes: int) -> None:
    line = orjson.dumps({"ts": 1.0, "stage": "pretrain", "kind": "step", "step": 1, "loss": 3.0,
                         "tokens_per_s": 1e5, "note": "x" * 120}) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range((megabytes << 20) // len(line)):
            f.write(line)


def test_dashboard_once_memory_is_flat_in_the_log_size(tmp_path):
    _event_log(tmp_path / "small" / "events.jsonl", 4)
    _event_log(tmp_path / "large" / "events.jsonl", 40)
    small = _peak_rss_mb(["dashboard", "--once", str(tmp_path / "small")])
    large = _peak_rss_mb(["dashboard", "--once", str(tmp_path / "large")])
    assert small[0] == 0 and large[0] == 0, large[2][-2000:]
    assert large[1] - small[1] < 40, f"{small[1]:.0f} MB for 4 MB of events, {large[1]:.0f} MB for 40 MB"


# ---- 8. defaults that work for any process count ------------------------------------------------------


@pytest.mark.parametrize(("nproc", "shown"), [(2, "micro-batch 16 × 1 accumulation"), (3, "global batch 33 sequences")])
def test_any_process_count_works_without_batch_flags(tmp_path, nproc, shown):
    shard = write_shard(tmp_path / "d.jsonl", make_records(20))
    result = runner.invoke(app, ["pretrain", "--size", "tiny", "--nproc-per-node", str(nproc), "--data", str(shard),
                                 "--steps", "6", "--runs-dir", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert shown in result.output


def test_three_processes_really_train_with_the_adapted_batch(tmp_path, small_tokenizer):
    shard = write_shard(tmp_path / "d.jsonl.zst", make_records(300, seed=4))
    result = blissctl("pretrain", "--size", "tiny", "--nproc-per-node", "3", "--data", str(shard), "--steps", "2",
                      "--seq-len", "32", "--tokenizer", str(small_tokenizer), "--device", "cpu",
                      "--runs-dir", str(tmp_path), "--run", "three", "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "micro-batch 11 per process" in result.stdout
    done = [e for e in events(tmp_path / "three") if e["kind"] == "done"]
    assert done and done[-1]["steps"] == 2


# ---- and the bad input that already held up, so that it keeps holding ------------------------------


def test_bad_lines_are_skipped_and_counted_and_a_truncated_file_is_one_line(tmp_path, small_tokenizer):
    good = make_records(30)
    lines = [*good[:10], b"{not json", b'{"text": 5}', b'{"other": "x"}', b"\xff\xfe bad utf8", b"", b'{"text": ""}',
             *good[10:]]
    write_shard(tmp_path / "pool" / "a.jsonl", lines)
    result = runner.invoke(app, ["select", "--input", str(tmp_path / "pool"), "--tokenizer", str(small_tokenizer),
                                 "--workers", "0", "--runs-dir", str(tmp_path / "runs"), "--run", "bad"])
    assert result.exit_code == 0, result.output
    skipped = orjson.loads((tmp_path / "runs" / "bad" / "selected" / "manifest.json").read_bytes())["skipped"]
    assert skipped == {"malformed_json": 1, "missing_text": 2, "bad_utf8": 1, "empty_text": 1, "blank_lines": 1,
                       "total": 6}
    cut = write_shard(tmp_path / "cut" / "b.jsonl.zst", make_records(200))
    cut.write_bytes(cut.read_bytes()[:-40])
    truncated = runner.invoke(app, ["select", "--input", str(cut), "--tokenizer", str(small_tokenizer), "--workers",
                                    "0", "--runs-dir", str(tmp_path / "runs"), "--run", "cut"])
    assert truncated.exit_code == 2
    assert "b.jsonl.zst" in error_line(truncated.stderr) and "truncated" in truncated.stderr


def test_the_pythia_tokenizer_is_usable_offline_as_a_path(tmp_path):
    shard = write_shard(tmp_path / "pool.jsonl", make_records(20))
    result = runner.invoke(app, ["select", "--input", str(shard), "--tokenizer", str(PYTHIA_TOKENIZER), "--workers",
                                 "0", "--runs-dir", str(tmp_path), "--run", "p"])
    assert result.exit_code == 0, result.output
