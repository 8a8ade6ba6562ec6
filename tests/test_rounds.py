"""``blissctl rounds``: the pool split, the plan of stages, bad input, and an end-to-end run whose resume
after ``kill -9`` gives exactly the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch
from typer.testing import CliRunner

from blissctl.cli import app
from engine.data.pool_split import choose_mode, document_part, split_pool
from engine.data.sources import discover_shards, read_documents
from engine.errors import UserError
from engine.models.torch_files import load_torch_file
from engine.rounds import RoundsSettings, dry_run_plan, plan_rounds
from tests.conftest import make_records, write_shard

ROOT = Path(__file__).resolve().parents[1]


def pool_of(folder: Path, shards: int, docs: int, seed: int = 0) -> list[Path]:
    return [write_shard(folder / f"pool-{k:02d}.jsonl.zst", make_records(docs, seed=seed + k)) for k in range(shards)]


# --- the split ------------------------------------------------------------------------------------------


def test_a_pool_of_many_shards_is_dealt_round_robin_by_shard(tmp_path):
    shards = pool_of(tmp_path / "pool", 6, 5)
    split = split_pool((str(tmp_path / "pool"),), 3, tmp_path / "exp")
    assert split.mode == "shard" and split.documents is None
    assert split.parts == tuple(tuple(str(p) for p in shards[k::3]) for k in range(3))
    assert not (tmp_path / "exp" / "pool").exists()  # nothing copied
    recorded = orjson.loads((tmp_path / "exp" / "pool-split.json").read_bytes())
    assert recorded["mode"] == "shard"
    assert choose_mode(8, 3) == "hash" and choose_mode(12, 3) == "shard" and choose_mode(4, 3) == "hash"


def test_few_shards_are_split_by_hash_of_document_id_disjointly_and_completely(tmp_path):
    pool_of(tmp_path / "pool", 2, 150)
    (tmp_path / "pool" / "pool-00.jsonl.zst").rename(tmp_path / "pool" / "a.jsonl.zst")  # labels, not order
    split = split_pool((str(tmp_path / "pool"),), 3, tmp_path / "exp", seed=7)
    assert split.mode == "hash" and sum(split.documents) == 300 and min(split.documents) >= 32
    seen = {}
    for k, files in enumerate(split.parts):
        for doc in read_documents([Path(f) for f in files]):
            assert doc.record["url"] not in seen
            seen[doc.record["url"]] = k
    assert len(seen) == 300
    # A document's part is a function of its id alone: the same seed gives the same split again.
    originals = discover_shards(str(tmp_path / "pool"))
    for shard in originals:
        for doc in read_documents([shard]):
            assert seen[doc.record["url"]] == document_part(shard.name, doc.line, 3, 7)
    again = split_pool((str(tmp_path / "pool"),), 3, tmp_path / "exp-again", seed=7)
    assert again.documents == split.documents


def test_a_pool_too_small_for_the_rounds_is_one_line(tmp_path):
    pool_of(tmp_path / "pool", 1, 40)
    with pytest.raises(UserError, match="too small for 3 parts"):
        split_pool((str(tmp_path / "pool"),), 3, tmp_path / "exp")
    with pytest.raises(UserError, match="--split shard"):
        split_pool((str(tmp_path / "pool"),), 3, tmp_path / "exp2", mode="shard")


# --- the plan -------------------------------------------------------------------------------------------


def settings(pool: str, val: str, **changes) -> RoundsSettings:
    base = dict(pool=(pool,), val=val, rounds=1, round_tokens=8192, batch_tokens=1024, seq_len=64, proxy_steps=4,
                scorer_steps=2, scorer_seq_len=32, scorer_batch_size=4, inner_steps=2, eval_points=2, chunks=1,
                budget="40%")
    return RoundsSettings(**{**base, **changes})


def test_the_plan_follows_the_method_round_by_round(tmp_path):
    exp = tmp_path / "exp"
    stages = plan_rounds(settings("pool", "val.jsonl", rounds=2), exp, None)
    assert [(s.round, s.role, s.run_dir.name) for s in stages] == [
        (0, "select", "r0-select"), (0, "pretrain", "r0-lm"), (0, "proxy", "r0-proxy"),
        (1, "train-scorer", "r1-scorer"), (1, "select", "r1-select"), (1, "pretrain", "r1-lm"),
        (2, "train-scorer", "r2-scorer"), (2, "select", "r2-select"), (2, "pretrain", "r2-lm")]
    argv = {s.run_dir.name: s.argv for s in stages}

    def value(run, flag):
        return argv[run][argv[run].index(flag) + 1]

    assert "--scorer" in argv["r0-select"] and value("r0-select", "--scorer") == "random"
    assert "--tokenizer" not in argv["r0-select"]  # round 0 trains the experiment's tokenizer
    tokenizer = str(exp / "r0-select" / "tokenizer.json")
    assert value("r1-lm", "--data") == str(exp / "r1-select" / "selected")
    # The proxy is reset to round 0's at every round; the score model goes on; the latest model is the target.
    assert value("r1-scorer", "--proxy-init") == value("r2-scorer", "--proxy-init") == str(exp / "r0-proxy")
    assert "--score-init" not in argv["r1-scorer"] and value("r2-scorer", "--score-init") == str(exp / "r1-scorer")
    assert value("r1-scorer", "--target") == str(exp / "r0-lm") and value("r2-scorer", "--target") == str(exp / "r1-lm")
    assert value("r2-scorer", "--warmup-steps") == "0"
    # Pretraining continues the model at a constant rate halved each round, with an evaluation branch.
    assert value("r1-lm", "--init-from") == str(exp / "r0-lm") and value("r2-lm", "--init-from") == str(exp / "r1-lm")
    assert [float(value(f"r{r}-lm", "--lr")) for r in range(3)] == [1e-3, 5e-4, 2.5e-4]
    assert {value(f"r{r}-lm", "--lr-schedule") for r in range(3)} == {"constant"}
    assert value("r1-lm", "--decay-steps") == "1"  # a tenth of 8 steps, at least one
    # Each round reads its own part.
    assert value("r1-select", "--input").endswith("part-1") and value("r2-scorer", "--train").endswith("part-2")

    random_arm = plan_rounds(settings("pool", "val.jsonl", rounds=2, scorer="random"), exp, None)
    assert [s.role for s in random_arm] == ["select", "pretrain"] * 3
    assert all(s.argv[s.argv.index("--scorer") + 1] == "random" for s in random_arm if s.role == "select")
    r1_random = next(s for s in random_arm if s.run_dir.name == "r1-select")
    assert r1_random.argv[r1_random.argv.index("--tokenizer") + 1] == tokenizer  # every arm counts the same tokens
    once = plan_rounds(settings("pool", "val.jsonl", rounds=2, scorer_rounds=1), exp, None)
    assert [s.run_dir.name for s in once if s.role == "train-scorer"] == ["r1-scorer"]
    r2 = next(s for s in once if s.run_dir.name == "r2-select")
    assert r2.argv[r2.argv.index("--scorer-run") + 1] == "r1-scorer"


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path):
    pool_of(tmp_path / "pool", 2, 100)
    lines = dry_run_plan(settings(str(tmp_path / "pool"), str(tmp_path / "pool" / "pool-00.jsonl.zst")),
                         tmp_path / "runs" / "exp")
    assert len(lines) == 6 and all(line.startswith("blissctl ") for line in lines)
    assert not (tmp_path / "runs").exists()
    result = subprocess.run([sys.executable, "-m", "blissctl", "rounds", "--pool", str(tmp_path / "pool"),
                             "--runs-dir", str(tmp_path / "runs"), "--dry-run"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.count("blissctl ") == 9
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"rounds": 0}, "--rounds"), ({"scorer": "magic"}, "--scorer"), ({"budget": "150%"}, "budget"),
    ({"lr_factor": 2.0}, "--lr-factor"), ({"batch_tokens": 100}, "--batch-tokens"), ({"size": "9b"}, "size"),
])
def test_bad_settings_are_one_line(changes, message):
    with pytest.raises(UserError, match=message):
        settings("pool", "val", **changes)


def _fake_done_round0(exp: Path, settings_used: RoundsSettings) -> None:
    """Round 0's three stages as finished folders, and the record naming them (no process runs)."""
    from engine.rounds import experiment_record

    stages = plan_rounds(settings_used, exp, None)
    for stage in stages:
        if stage.round != 0:
            continue
        stage.run_dir.mkdir(parents=True)
        if stage.role == "select":
            (stage.run_dir / "selected").mkdir()
            (stage.run_dir / "selected" / "manifest.json").write_text("{}")
            (stage.run_dir / "tokenizer.json").write_text("tok")
        else:
            events = [{"stage": "pretrain", "kind": "start"}, {"stage": "pretrain", "kind": "done"}]
            (stage.run_dir / "events.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    record = experiment_record(settings_used, exp.name, stages, {"r0-lm": {"cpu_s": 12.5}}, None)
    (exp / "experiment.json").write_bytes(orjson.dumps(record))


def test_round0_from_copies_a_matching_round_0_and_refuses_one_that_differs(tmp_path):
    from engine.rounds import copy_round0

    pool = str(pool_of(tmp_path / "pool", 2, 20)[0].parent)
    base = tmp_path / "runs" / "base"
    _fake_done_round0(base, settings(pool, "val.jsonl", rounds=2))
    # Score-model settings and the arm do not change round 0: it is copied, timings with it.
    variant = settings(pool, "val.jsonl", rounds=2, lr_scorer=1e-3, z_steps=1, round0_from=str(base))
    exp = tmp_path / "runs" / "variant"
    stages = plan_rounds(variant, exp, None)
    timings: dict = {}
    copy_round0(variant, exp, stages, timings)
    assert [s.run_dir.name for s in stages if s.done()] == ["r0-select", "r0-lm", "r0-proxy"]
    assert (exp / "r0-select" / "tokenizer.json").read_text() == "tok"
    assert timings["r0-lm"]["cpu_s"] == 12.5 and timings["r0-lm"]["copied_from"] == str(base)
    assert not list(exp.glob("*.copying"))
    # --force removes the copies, and a copy a kill cut short, with the rest of what the experiment wrote.
    from engine.rounds import clear_experiment, experiment_record

    (exp / "r0-lm.copying").mkdir()
    (exp / "experiment.json").write_bytes(orjson.dumps(experiment_record(variant, exp.name, stages, timings, None)))
    clear_experiment(exp)
    assert not exp.exists()
    fresh = dry_run_plan(variant, tmp_path / "runs" / "other")
    assert fresh[0].startswith("# copy r0-select from") and fresh[3].startswith("blissctl train-scorer")
    # A setting round 0 depends on is refused, named.
    other = settings(pool, "val.jsonl", rounds=2, round_tokens=500_000, round0_from=str(base))
    with pytest.raises(UserError, match="--round-tokens"):
        copy_round0(other, tmp_path / "runs" / "x", plan_rounds(other, tmp_path / "runs" / "x", None), {})
    nothing = settings(pool, "val.jsonl", rounds=2, round0_from=str(tmp_path / "runs" / "variant" / "r0-lm"))
    with pytest.raises(UserError, match="not a blissctl rounds experiment"):
        copy_round0(nothing, tmp_path / "runs" / "y", plan_rounds(nothing, tmp_path / "runs" / "y", None), {})


# --- end to end -----------------------------------------------------------------------------------------


def rounds_command(pool: Path, val: Path, runs: Path, *extra: str, tokenizer: Path) -> list[str]:
    return [sys.executable, "-m", "blissctl", "rounds", "--pool", str(pool), "--val", str(val), "--runs-dir", str(runs),
            "--tokenizer", str(tokenizer),
            "--run", "exp", "--rounds", "1", "--round-tokens", "4k", "--batch-tokens", "1024", "--seq-len", "64",
            "--proxy-steps", "3", "--scorer-steps", "3", "--scorer-seq-len", "32", "--scorer-batch-size", "4",
            "--inner-steps", "2", "--eval-points", "1", "--chunks", "1", "--budget", "40%", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def small_experiment(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("rounds")
    pool_of(root / "pool", 2, 120, seed=40)
    val = write_shard(root / "val.jsonl", make_records(16, seed=90))
    return root, root / "pool", val, small_tokenizer


@pytest.mark.slow  # three rounds experiments of six stage processes each: about 2 minutes on 2 cores
def test_an_experiment_killed_anywhere_resumes_to_exactly_the_uninterrupted_result(small_experiment):
    root, pool, val, tokenizer = small_experiment
    reference = root / "reference"
    done = subprocess.run(rounds_command(pool, val, reference, tokenizer=tokenizer), capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = orjson.loads((reference / "exp" / "rounds-result.json").read_bytes())
    assert [r["round"] for r in expected["rounds"]] == [0, 1]
    assert all(r["val_loss"] is not None and r["val_loss_main"] is not None for r in expected["rounds"])
    assert expected["rounds"][1]["tokens"] == 2 * 4096  # the model went on from round 0
    assert expected["rounds"][1]["score_model"] == "r1-scorer" and expected["rounds"][1]["scorer"] == "bliss"
    assert "one model, pretrained round after round" in done.stdout and "decayed branch" in done.stdout

    # The same experiment, killed with SIGKILL once round 1's score model has a checkpoint (mid-stage).
    killed = root / "killed"
    proc = subprocess.Popen(rounds_command(pool, val, killed, tokenizer=tokenizer), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT, start_new_session=True)
    marker = killed / "exp" / "r1-scorer" / "checkpoints" / "train-scorer-state.pt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    assert not _processes_writing(killed), "a stage outlived the experiment it belonged to"
    assert not (killed / "exp" / "rounds-result.json").exists()
    from engine.rounds import result_so_far

    so_far = result_so_far(killed / "exp")  # what a stopped experiment has finished: round 0 alone
    assert not so_far["complete"] and [r["round"] for r in so_far["rounds"]] == [0]
    assert so_far["rounds"][0]["val_loss"] == expected["rounds"][0]["val_loss"] and expected["complete"]

    refused = CliRunner().invoke(app, rounds_command(pool, val, killed, tokenizer=tokenizer)[3:])
    assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = subprocess.run(rounds_command(pool, val, killed, "--resume", tokenizer=tokenizer), capture_output=True, text=True, cwd=ROOT,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "already done" in resumed.stdout
    got = orjson.loads((killed / "exp" / "rounds-result.json").read_bytes())
    for row_expected, row_got in zip(expected["rounds"], got["rounds"], strict=True):
        for key in ("val_loss", "val_loss_main", "tokens", "documents_kept", "tokens_kept", "threshold", "composition"):
            assert row_got[key] == row_expected[key], (row_got["round"], key)
    for stage in ("r1-lm/checkpoints", "r1-lm/decayed/checkpoints"):
        a = _latest_weights(reference / "exp" / stage)
        b = _latest_weights(killed / "exp" / stage)
        assert all(torch.equal(a[k], b[k]) for k in a)

    # An experiment started from the reference's round 0 (copied, not rerun) gives the same rounds.
    shared = subprocess.run(rounds_command(pool, val, root / "shared", "--round0-from", str(reference / "exp"),
                                           tokenizer=tokenizer), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert shared.returncode == 0, shared.stdout[-3000:] + shared.stderr[-3000:]
    assert "copied from" in shared.stdout
    got = orjson.loads((root / "shared" / "exp" / "rounds-result.json").read_bytes())
    assert [r["val_loss"] for r in got["rounds"]] == [r["val_loss"] for r in expected["rounds"]]

    # Other settings on the same experiment are refused, naming what changed.
    other = CliRunner().invoke(app, rounds_command(pool, val, killed, "--budget", "30%", "--resume",
                                                   tokenizer=tokenizer)[3:])
    assert other.exit_code == 2 and "--budget" in other.output


def _latest_weights(checkpoints: Path) -> dict:
    name = (checkpoints / "latest").read_text().strip()
    return load_torch_file(checkpoints / name / "model.pt", what="model")


def _processes_writing(folder: Path) -> list[int]:
    """Pids whose command line names ``folder`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in cmdline:
                found.append(int(entry.name))
    return found


def test_rounds_never_writes_into_a_folder_that_is_not_its_experiment(tmp_path):
    from engine.rounds import prepare_experiment

    folder = tmp_path / "runs" / "demo-bliss"
    (folder / "selected").mkdir(parents=True)
    with pytest.raises(UserError, match="not a blissctl rounds experiment"):
        prepare_experiment(settings("pool", "val"), folder, resume=True, force=False)
    assert prepare_experiment(settings("pool", "val"), tmp_path / "runs" / "new", resume=True, force=False) == {}
