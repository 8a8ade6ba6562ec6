"""``blissctl eval --tasks``: the paper's downstream table from a blissctl checkpoint, recorded in the run
(events, report/eval.md) and shown by the dashboard."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from blissctl.cli import app
from tests.engine.test_tasks import always_says, write_task_data

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

runner = CliRunner()
TASKS = ("sciq", "arc_easy", "boolq", "piqa")


@pytest.fixture
def rigged_run(tmp_path, small_tokenizer):
    """A pretrain run whose checkpoint always says the word every right answer is made of."""
    from engine.data.tokenizer import load_tokenizer
    from engine.eval.tasks import hf_tokenizer
    from engine.models.checkpoints import write_checkpoint
    from engine.models.presets import pythia_tiny
    from engine.run_dir import config_to_dict

    model = always_says(hf_tokenizer(small_tokenizer), "no")
    run = tmp_path / "runs" / "rigged"
    (run / "tokenizer.json").parent.mkdir(parents=True)
    (run / "tokenizer.json").write_bytes(small_tokenizer.read_bytes())
    write_checkpoint(run / "checkpoints", 1, model_state=model.state_dict(), optimizer_state={}, trainer_state={},
                     rng_states=[], meta={"model": config_to_dict(pythia_tiny()), "seq_len": 64,
                                          "vocab_size": load_tokenizer(small_tokenizer).get_vocab_size()},
                     tokenizer_path=run / "tokenizer.json", keep=1)
    return run


def test_eval_tasks_prints_records_and_reports_the_papers_table(tmp_path, rigged_run):
    data = write_task_data(tmp_path / "tasks", TASKS)
    result = runner.invoke(app, ["eval", "--checkpoint", str(rigged_run), "--tasks", ",".join(TASKS),
                                 "--task-data", str(data), "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "zero-shot accuracy" in result.output and "100.0" in result.output and "average" in result.output
    event = [orjson.loads(line) for line in (rigged_run / "events.jsonl").read_bytes().splitlines()][-1]
    assert event["stage"] == "eval" and event["kind"] == "tasks" and event["tasks"] == list(TASKS)
    assert all(event[f"{task}_acc"] == 1.0 for task in TASKS) and event["average_score"] == 1.0
    report = (rigged_run / "report" / "eval.md").read_text()
    assert "| sciq | 100.0 |" in report and "| average |" in report

    shown = runner.invoke(app, ["dashboard", "--once", str(rigged_run)], env={"COLUMNS": "160"})
    assert shown.exit_code == 0, shown.output
    assert "zero-shot accuracy" in shown.output and "piqa" in shown.output and "100.0" in shown.output


def test_eval_tasks_without_data_or_with_an_unknown_task_is_one_line(tmp_path, rigged_run):
    missing = runner.invoke(app, ["eval", "--checkpoint", str(rigged_run), "--tasks", "paper"])
    assert missing.exit_code == 2 and "--tasks needs --task-data" in missing.stderr
    unknown = runner.invoke(app, ["eval", "--checkpoint", str(rigged_run), "--tasks", "squad",
                                  "--task-data", str(tmp_path)])
    assert unknown.exit_code == 2 and "squad" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
    empty = runner.invoke(app, ["eval", "--checkpoint", str(rigged_run), "--tasks", "sciq",
                                "--task-data", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "folder not found" in empty.stderr and "Traceback" not in empty.stderr


def test_lm_eval_scores_an_exported_model_as_it_scores_the_checkpoint(tmp_path, rigged_run):
    """What a user with their own lm-eval does: export, then load with transformers' Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.eval.tasks import TaskEvalConfig, run_tasks
    from engine.models.export import export_hf

    exported = export_hf(rigged_run, tmp_path / "hf").path
    model = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    data = write_task_data(tmp_path / "tasks", TASKS)
    results = run_tasks(model, tokenizer, TaskEvalConfig(tasks=TASKS, task_data=data, device="cpu"))
    assert [t.task for t in results.tasks] == list(TASKS)
    assert all(t.acc == 1.0 for t in results.tasks) and results.average_score == 1.0
