"""Zero-shot task accuracy with lm-eval from local files: every paper task runs offline, and the right
choice is wired to the right answer (a model that can only say one thing scores exactly 1 or 0)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

from engine.errors import UserError
from engine.eval.tasks import (
    PAPER_TASKS,
    TASK_SPECS,
    TaskEvalConfig,
    TaskResults,
    TaskScore,
    builtin_task_yaml,
    format_table,
    hf_tokenizer,
    hub_offline,
    local_task_config,
    parse_tasks,
    run_tasks,
)

X = "no"
"""The word the rigged model always says: one token of the small tokenizer, and BoolQ's "no"."""
OTHER_WORDS = ["the of and", "to in is", "was he for", "it with as", "his on be"]
"""Wrong choices: none contains X."""


# --- synthetic task files in each task's Hugging Face layout -------------------------------------


def right(n_choices: int, row: int) -> int:
    """Where the right choice sits in example ``row``: it moves, so a positional bias cannot score 1."""
    return row % n_choices


def choices_with_x(n_choices: int, gold: int) -> list[str]:
    words = iter(OTHER_WORDS)
    return [f"{X} {X} {X}" if i == gold else next(words) for i in range(n_choices)]


def task_rows(task: str, n: int, *, mislabel: bool) -> list[dict]:
    """``n`` rows of ``task`` whose right choice is all X; ``mislabel`` points each answer at a wrong one."""
    rows = []
    for i in range(n):
        if task == "sciq":  # lm-eval's target is always the 4th choice, correct_answer
            good, bad = f"{X} {X} {X}", OTHER_WORDS[i % 3]
            answer, first = (bad, good) if mislabel else (good, bad)
            rows.append({"question": "What is the of?", "distractor1": first, "distractor2": "to in is",
                         "distractor3": "was he for", "correct_answer": answer, "support": "The of and to."})
            continue
        if task == "boolq":
            rows.append({"question": "is it the one", "passage": "It was the one.", "idx": i,
                         "label": 1 if mislabel else 0})
            continue
        n_choices = {"piqa": 2, "arc_easy": 3}.get(task, 4)
        gold = right(n_choices, i)
        choices = choices_with_x(n_choices, gold)
        label = (gold + 1) % n_choices if mislabel else gold
        if task in ("arc_easy", "arc_challenge"):
            labels = ["1", "2", "3", "4"][:n_choices] if i % 2 else ["A", "B", "C", "D"][:n_choices]
            rows.append({"id": f"q{i}", "question": "Which is it?", "choices": {"text": choices, "label": labels},
                         "answerKey": labels[label]})
        elif task == "openbookqa":
            rows.append({"id": f"q{i}", "question_stem": "The one is",
                         "choices": {"text": choices, "label": list("ABCD")},
                         "answerKey": "ABCD"[label]})
        elif task == "logiqa":
            rows.append({"label": "abcd"[label], "context": "He was the one.", "question": "Which is it?",
                         "options": choices})
        elif task == "hellaswag":  # HF's label is a string; endings get lm-eval's bracket clean-up
            rows.append({"ind": i, "activity_label": "Talking", "ctx_a": "He said it.", "ctx_b": "then he",
                         "ctx": "He said it. then he", "endings": [c + " [title]" for c in choices],
                         "source_id": "s", "split": "val", "split_type": "indomain", "label": str(label)})
        elif task == "piqa":
            rows.append({"goal": "say the one", "sol1": choices[0], "sol2": choices[1], "label": label})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_task_data(root: Path, tasks, *, n: int = 4, mislabel: bool = False, parquet: tuple[str, ...] = ()) -> Path:
    for task in tasks:
        suffix = ".parquet" if task in parquet else ".jsonl"
        write_rows(root / task / f"{TASK_SPECS[task].split}{suffix}", task_rows(task, n, mislabel=mislabel))
    return root


def winogrande_rows(n: int, *, mislabel: bool) -> list[dict]:
    """The blank is followed by "the the the": the option "the" makes it a run of repeats."""
    rows = []
    for i in range(n):
        options = ("the", "of") if i % 2 == 0 else ("of", "the")
        gold = options.index("the")
        answer = (1 - gold) if mislabel else gold
        rows.append({"sentence": "He said _ the the the.", "option1": options[0], "option2": options[1],
                     "answer": str(answer + 1)})
    return rows


# --- models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_installed():
    return pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer, lm_eval_installed):
    return hf_tokenizer(small_tokenizer)


def tiny_model(tokenizer):
    from engine.models.families import build_causal_lm
    from engine.models.presets import pythia_tiny

    return build_causal_lm(pythia_tiny(), len(tokenizer)).eval()


def always_says(tokenizer, word: str, margin: float = 50.0):
    """A model whose next-token logits are the same everywhere: ``margin`` on ``word``, 0 elsewhere.
    The final layer norm's zero weight makes its output its bias, whatever the input; the bias picks
    one column of the output embedding, zero but for ``word``'s row."""
    import torch

    token_ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    assert len(token_ids) == 1, f"{word!r} must be one token of the test tokenizer"
    model = tiny_model(tokenizer)
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0
        head = model.get_output_embeddings().weight  # (vocab, d_model)
        head[:, 0] = 0.0
        head[token_ids[0], 0] = margin
    return model


def repeats_last_token(tokenizer):
    """A model that predicts the token it has just read: the blocks add nothing to the residual
    stream, and the output embedding is the layer-normed input embedding, so the logit of ``v`` after
    ``t`` is ``<LN(e_t), LN(e_v)>``, largest (= d_model) for ``v = t``."""
    import torch

    model = tiny_model(tokenizer)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            for linear in (layer.attention.dense, layer.mlp.dense_4h_to_h):
                linear.weight.zero_()
                linear.bias.zero_()
        norm = model.gpt_neox.final_layer_norm
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        embedded = model.get_input_embeddings().weight
        model.get_output_embeddings().weight.copy_(torch.nn.functional.layer_norm(embedded, embedded.shape[1:]))
    return model


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection is recorded and refused."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def evaluate(model, tokenizer, data: Path, tasks, **overrides) -> TaskResults:
    config = TaskEvalConfig(tasks=tuple(tasks), task_data=data, batch_size=8, device="cpu", **overrides)
    return run_tasks(model, tokenizer, config)


# --- lm-eval runs every paper task from local files ------------------------------------------------


def test_every_paper_task_runs_offline_from_local_files(tmp_path, tokenizer, no_network):
    data = write_task_data(tmp_path / "tasks", [t for t in PAPER_TASKS if t != "winogrande"], parquet=("piqa",))
    write_rows(data / "winogrande" / "validation.jsonl", winogrande_rows(4, mislabel=False))

    results = evaluate(tiny_model(tokenizer), tokenizer, data, PAPER_TASKS)

    assert [t.task for t in results.tasks] == list(PAPER_TASKS)
    for score in results.tasks:
        assert 0.0 <= score.acc <= 1.0 and score.n == 4, score
        if score.task in ("boolq", "winogrande"):  # lm-eval defines acc only for these two
            assert score.acc_norm is None and score.score == score.acc
        else:
            assert 0.0 <= score.acc_norm <= 1.0 and score.score == score.acc_norm
    assert results.average_acc == pytest.approx(sum(t.acc for t in results.tasks) / 9)
    assert results.average_score == pytest.approx(sum(t.score for t in results.tasks) / 9)
    assert no_network == []


def test_limit_caps_the_examples_per_task(tmp_path, tokenizer):
    data = write_task_data(tmp_path / "tasks", ["piqa"], n=6)
    results = evaluate(tiny_model(tokenizer), tokenizer, data, ["piqa"], limit=2)
    assert results.by_task()["piqa"].n == 2


def test_few_shot_examples_come_from_the_train_file(tmp_path, tokenizer):
    data = write_task_data(tmp_path / "tasks", ["piqa"])
    with pytest.raises(UserError) as error:  # the paper is zero-shot; shots need a train split
        evaluate(tiny_model(tokenizer), tokenizer, data, ["piqa"], num_fewshot=2)
    assert str(data / "piqa" / "train.jsonl") in one_line(error)
    write_rows(data / "piqa" / "train.jsonl", task_rows("piqa", 2, mislabel=False))
    with pytest.raises(UserError) as error:  # lm-eval draws shots + 1 rows
        evaluate(tiny_model(tokenizer), tokenizer, data, ["piqa"], num_fewshot=2)
    assert "needs more than 2 rows" in one_line(error)
    write_rows(data / "piqa" / "train.jsonl", task_rows("piqa", 4, mislabel=False))
    results = evaluate(always_says(tokenizer, X), tokenizer, data, ["piqa"], num_fewshot=2)
    assert results.num_fewshot == 2 and results.by_task()["piqa"].acc == 1.0


# --- the right choice is wired to the right answer ---------------------------------------------------

RIGGED_TASKS = [t for t in PAPER_TASKS if t != "winogrande"]


def test_a_model_that_always_says_the_right_choice_scores_one(tmp_path, tokenizer):
    data = write_task_data(tmp_path / "tasks", RIGGED_TASKS, parquet=("hellaswag",))
    results = evaluate(always_says(tokenizer, X), tokenizer, data, RIGGED_TASKS)
    for score in results.tasks:
        assert score.acc == 1.0, score
        assert score.acc_norm in (None, 1.0), score
    assert results.average_score == 1.0


def test_answers_pointing_at_a_wrong_choice_score_zero(tmp_path, tokenizer):
    data = write_task_data(tmp_path / "tasks", RIGGED_TASKS, mislabel=True)
    results = evaluate(always_says(tokenizer, X), tokenizer, data, RIGGED_TASKS)
    for score in results.tasks:
        assert score.acc == 0.0, score
        assert score.acc_norm in (None, 0.0), score


def test_acc_norm_divides_by_the_choice_length_and_acc_does_not(tmp_path, tokenizer):
    # Each word but X costs the rigged model ~50 nats. sol1 has two such words in 30 characters, sol2
    # one in 2: summed, sol2 is likelier (acc picks it); per character, sol1 is (acc_norm picks it).
    long_choice = " ".join([X] * 8 + ["the", "of"])
    rows = [{"goal": "say it", "sol1": long_choice, "sol2": "of", "label": 0}] * 3
    data = tmp_path / "tasks"
    write_rows(data / "piqa" / "validation.jsonl", rows)
    piqa = evaluate(always_says(tokenizer, X), tokenizer, data, ["piqa"]).by_task()["piqa"]
    assert (piqa.acc, piqa.acc_norm, piqa.score) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize(("mislabel", "expected"), [(False, 1.0), (True, 0.0)])
def test_winogrande_scores_the_option_that_makes_the_sentence_likely(tmp_path, tokenizer, mislabel, expected):
    # WinoGrande puts each option in the context and scores the same continuation after it, so a model
    # that ignores its input ties; one that repeats its last token prefers "... the | the the the."
    data = tmp_path / "tasks"
    write_rows(data / "winogrande" / "validation.jsonl", winogrande_rows(4, mislabel=mislabel))
    results = evaluate(repeats_last_token(tokenizer), tokenizer, data, ["winogrande"])
    assert results.by_task()["winogrande"].acc == expected


def test_local_definitions_are_lm_evals_own_but_for_where_the_rows_come_from(tmp_path, lm_eval_installed):
    from lm_eval.tasks._yaml_loader import load_yaml

    dataset_keys = {"dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split",
                    "training_split", "tag"}
    for task in PAPER_TASKS:
        split = TASK_SPECS[task].split
        builtin = builtin_task_yaml(task)
        config = local_task_config(task, {split: tmp_path / f"{split}.jsonl"}, tmp_path / "cache", builtin)
        ours = tmp_path / f"{task}.yaml"
        ours.write_text(json.dumps(config))  # JSON is YAML
        theirs, local = load_yaml(builtin, resolve_func=False), load_yaml(ours, resolve_func=False)
        assert {k: v for k, v in local.items() if k not in dataset_keys} == {
            k: v for k, v in theirs.items() if k not in dataset_keys
        }, task
        assert theirs[f"{split}_split"] == split, task  # the split we ask users for is the one lm-eval scores
        if split == "validation":
            assert theirs.get("test_split") is None, task
        assert local["dataset_kwargs"]["data_files"] == {split: str(tmp_path / f"{split}.jsonl")}


# --- one-line errors ---------------------------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_a_missing_task_file_names_the_path_and_the_fields(tmp_path, tokenizer):
    data = write_task_data(tmp_path / "tasks", ["sciq"])
    with pytest.raises(UserError) as error:
        evaluate(tiny_model(tokenizer), tokenizer, data, ["sciq", "hellaswag"])
    message = one_line(error)
    assert str(data / "hellaswag" / "validation.jsonl") in message
    assert "Rowan/hellaswag" in message and "ctx_a" in message and "endings" in message


def test_a_row_without_a_field_names_its_line(tmp_path, tokenizer):
    rows = task_rows("piqa", 3, mislabel=False)
    del rows[1]["sol2"]
    data = tmp_path / "tasks"
    write_rows(data / "piqa" / "validation.jsonl", rows)
    with pytest.raises(UserError) as error:
        evaluate(tiny_model(tokenizer), tokenizer, data, ["piqa"])
    assert f"{data / 'piqa' / 'validation.jsonl'}:2: missing sol2" in one_line(error)


def test_an_answer_lm_eval_would_crash_on_is_named(tmp_path, tokenizer):
    rows = winogrande_rows(2, mislabel=False)
    rows[0]["answer"] = 1  # an int, where the hub has the string "1"
    data = tmp_path / "tasks"
    write_rows(data / "winogrande" / "validation.jsonl", rows)
    with pytest.raises(UserError) as error:
        evaluate(tiny_model(tokenizer), tokenizer, data, ["winogrande"])
    assert 'answer must be the string "1" or "2"' in one_line(error)


def test_a_missing_task_data_folder_is_one_line(tmp_path, tokenizer):
    with pytest.raises(UserError) as error:
        evaluate(tiny_model(tokenizer), tokenizer, tmp_path / "nowhere", ["sciq"])
    assert "--task-data" in one_line(error)


def test_unknown_task_names_list_the_known_ones():
    assert parse_tasks("paper") == PAPER_TASKS
    assert parse_tasks(" piqa, sciq,piqa ") == ("piqa", "sciq")
    with pytest.raises(UserError) as error:
        parse_tasks("sciq,mmlu")
    message = one_line(error)
    assert "'mmlu'" in message and all(task in message for task in PAPER_TASKS)
    with pytest.raises(UserError):
        TaskEvalConfig(tasks=("mmlu",), task_data=Path("."))


def test_a_task_lm_eval_does_not_define_is_one_line(tmp_path, lm_eval_installed):
    with pytest.raises(UserError) as error:
        builtin_task_yaml("sciq", tasks_dir=tmp_path)  # an lm-eval whose tasks folder lacks it
    assert "does not define the task 'sciq'" in one_line(error)


def test_a_model_lm_eval_cannot_run_is_one_line(tmp_path, tokenizer):
    import torch

    data = write_task_data(tmp_path / "tasks", ["piqa"])
    with pytest.raises(UserError) as error:
        evaluate(torch.nn.Linear(4, 4), tokenizer, data, ["piqa"])
    assert "cannot run a Linear" in one_line(error)

    from transformers import GPTNeoXModel  # the network without its language-model head

    model = tiny_model(tokenizer)
    with pytest.raises(UserError) as error:
        evaluate(GPTNeoXModel(model.config), tokenizer, data, ["piqa"])
    assert "not a causal language model" in one_line(error)

    from engine.models.families import build_causal_lm
    from engine.models.presets import pythia_tiny

    trained_on_fewer = build_causal_lm(pythia_tiny(), 100)  # 128 embedding rows once padded
    with pytest.raises(UserError) as error:
        evaluate(trained_on_fewer, tokenizer, data, ["piqa"])
    assert f"the tokenizer has {len(tokenizer):,} tokens but the model embeds only 128" in one_line(error)


def test_a_missing_tokenizer_is_one_line(tmp_path):
    with pytest.raises(UserError) as error:
        hf_tokenizer(tmp_path / "tokenizer.json")
    assert "tokenizer not found" in one_line(error)


def test_without_lm_eval_the_error_says_what_to_install(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError) as error:
        evaluate(tiny_model(tokenizer), tokenizer, tmp_path, ["sciq"])
    assert "pip install 'blissctl[eval]'" in one_line(error)


def test_flags_are_checked_when_the_config_is_built():
    for bad, flag in (({"batch_size": 0}, "--batch-size"), ({"device": "tpu"}, "--device"),
                      ({"limit": 0}, "--limit"), ({"num_fewshot": -1}, "--num-fewshot")):
        with pytest.raises(UserError, match=flag):
            TaskEvalConfig(task_data=Path("."), **bad)


# --- offline mode, table and event ---------------------------------------------------------------


def test_offline_mode_is_on_inside_and_restored_after(monkeypatch, lm_eval_installed):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with hub_offline():
        assert all(os.environ[name] == "1" for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"))
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False


def test_table_and_event_show_what_the_paper_reports():
    results = TaskResults(
        tasks=(TaskScore(task="sciq", acc=0.8, acc_stderr=0.01, acc_norm=0.7, acc_norm_stderr=0.02, n=1000),
               TaskScore(task="boolq", acc=0.6, acc_stderr=0.01, acc_norm=None, acc_norm_stderr=None, n=3270)),
        num_fewshot=0, limit=None, lm_eval_version="0.4.13",
    )
    assert results.average_acc == pytest.approx(0.7)
    assert results.average_score == pytest.approx(0.65)  # sciq's acc_norm, boolq's acc
    assert format_table(results) == [
        ["task", "acc", "acc_norm", "score", "n"],
        ["sciq", "80.0", "70.0", "70.0", "1000"],
        ["boolq", "60.0", "-", "60.0", "3270"],
        ["average", "70.0", "", "65.0", "4270"],
    ]
    event = results.as_event()
    assert event["sciq_acc_norm"] == 0.7 and event["boolq_acc"] == 0.6 and "boolq_acc_norm" not in event
    assert event["average_score"] == pytest.approx(0.65) and event["tasks"] == ["sciq", "boolq"]
    assert all(not isinstance(value, dict) for value in event.values())  # flat: one figure per key
