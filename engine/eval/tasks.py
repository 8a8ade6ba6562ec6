"""Zero-shot accuracy on the BLISS paper's nine tasks, with lm-evaluation-harness, from local files.

BLISS (Hao et al., 2025, following MATES, Yu et al., 2024) judges a data selection by the zero-shot
accuracy of the model pretrained on it: SciQ, ARC-Easy, ARC-Challenge, LogiQA, OpenBookQA, BoolQ,
HellaSwag, PIQA and WinoGrande, scored by lm-eval (``lm_eval.simple_evaluate``). Here lm-eval runs in
process on the ``transformers`` model a pretrain checkpoint loads into, with lm-eval's own task
definitions (same prompts, choices, targets and metrics), but reading the examples from a folder the
user prepared once, so an evaluation never needs the network.

Data layout
-----------
``DIR/<task>/<split>.jsonl`` (or ``<split>.parquet``): one row per example, in the fields of the
Hugging Face dataset lm-eval's task reads, on the split lm-eval evaluates (its ``test_split`` when it
has one, else its ``validation_split``):

    folder         Hugging Face dataset (config)        split file        fields read
    -------------  -----------------------------------  ----------------  ------------------------------------------
    sciq           allenai/sciq                         test.jsonl        question, distractor1..3, correct_answer,
                                                                          support
    arc_easy       allenai/ai2_arc (ARC-Easy)           test.jsonl        question, choices {text, label}, answerKey
    arc_challenge  allenai/ai2_arc (ARC-Challenge)      test.jsonl        question, choices {text, label}, answerKey
    logiqa         EleutherAI/logiqa (logiqa)           test.jsonl        context, question, options, label ("a".."d")
    openbookqa     allenai/openbookqa (main)            test.jsonl        question_stem, choices {text, label},
                                                                          answerKey
    boolq          aps/super_glue (boolq)               validation.jsonl  passage, question, label (0 no, 1 yes)
    hellaswag      Rowan/hellaswag                      validation.jsonl  activity_label, ctx_a, ctx_b, endings, label
    piqa           baber/piqa                           validation.jsonl  goal, sol1, sol2, label (0 or 1)
    winogrande     allenai/winogrande (winogrande_xl)   validation.jsonl  sentence (with one "_"), option1, option2,
                                                                          answer ("1" or "2", a string as on the hub)

Other fields of a row (ARC's ``id``, HellaSwag's ``ctx``, ...) are kept and ignored. A user with
network fills the folder once with the ``datasets`` library, one ``to_json`` per entry of
``TASK_SPECS`` (its ``hf_path``, ``hf_name`` and ``split``): the README's "Downstream evaluation"
section has the loop. (A dataset that still ships a loading script, e.g. ``EleutherAI/logiqa``, wants
``revision="refs/convert/parquet"``, the hub's converted copy.)

How the local files reach lm-eval
---------------------------------
For each requested task a YAML is written to a temporary folder: it includes lm-eval's built-in
definition of the task (so prompt, choices, target, ``process_docs`` and metrics are lm-eval's, from
the installed version) and overrides only where the rows come from: ``dataset_path: json`` (or
``parquet``), ``dataset_kwargs: {data_files: {<split>: <file>}}``, the other splits unset. That folder
is the only one ``TaskManager(include_path=..., include_defaults=False)`` indexes, under the task's own
name. ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and ``HF_EVALUATE_OFFLINE`` are on while it runs.

Scores
------
Per task: ``acc`` (the choice with the highest summed log-likelihood is the answer) and ``acc_norm``
(log-likelihood divided by the choice's length in characters), each with lm-eval's standard error,
where lm-eval's task defines them: BoolQ and WinoGrande have ``acc`` only. ``score`` is what a BLISS /
MATES table lists for the task: ``acc_norm`` where lm-eval reports it, else ``acc``; the paper's
"average" is the plain mean of the nine scores (``TaskResults.average_score``). ``average_acc`` is the
mean of plain ``acc`` over the same tasks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.runtime import resolve_device

PAPER_TASKS = (
    "sciq",
    "arc_easy",
    "arc_challenge",
    "logiqa",
    "openbookqa",
    "boolq",
    "hellaswag",
    "piqa",
    "winogrande",
)
"""The nine lm-eval task names, in the order of the BLISS (and MATES) tables."""

DEVICES = ("cpu", "cuda", "auto")
DATA_SUFFIXES = (".jsonl", ".parquet")
INSTALL_HINT = "pip install 'blissctl[eval]'"


# --- the tasks ----------------------------------------------------------------------------------


def _choices_labels_problem(row: dict, answer_key: str) -> str | None:
    """ARC and OpenBookQA: the answer is the position of ``answerKey`` among ``choices.label``."""
    choices = row["choices"]
    if not (isinstance(choices, dict) and all(isinstance(choices.get(key), list) for key in ("text", "label"))):
        return 'choices must be {"text": [...], "label": [...]}'
    if len(choices["text"]) != len(choices["label"]):
        return "choices.text and choices.label differ in length"
    if not isinstance(answer_key, str) or answer_key not in choices["label"]:
        return f"answerKey {answer_key!r} is not one of choices.label {choices['label']}"
    return None


def _binary_label_problem(row: dict) -> str | None:
    label = row["label"]
    return None if type(label) is int and label in (0, 1) else f"label must be 0 or 1, not {label!r}"


def _logiqa_problem(row: dict) -> str | None:
    label, options = row["label"], row["options"]
    if not isinstance(options, list) or not 2 <= len(options) <= 4:
        return "options must be a list of up to four answers"
    letters = tuple("abcd"[: len(options)])
    if not isinstance(label, str) or label.strip() not in letters:
        return f"label must be one of {', '.join(letters)} (a string), not {label!r}"
    return None


def _hellaswag_problem(row: dict) -> str | None:
    endings = row["endings"]
    if not isinstance(endings, list) or not endings:
        return "endings must be a list of candidate endings"
    try:
        index = int(row["label"])
    except (TypeError, ValueError):
        index = -1
    if 0 <= index < len(endings):
        return None
    return f"label {row['label']!r} is not an index into the {len(endings)} endings"


def _winogrande_problem(row: dict) -> str | None:
    if not isinstance(row["sentence"], str) or "_" not in row["sentence"]:
        return 'sentence must contain a "_" where the option goes'
    answer = row["answer"]
    return None if answer in ("1", "2") else f'answer must be the string "1" or "2", not {answer!r}'


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One of the paper's tasks: where lm-eval defines it and what its local file must hold."""

    name: str
    """The lm-eval task name; also the folder under ``--task-data``."""
    builtin_yaml: str
    """lm-eval's definition, relative to ``lm_eval/tasks`` (as in lm-eval 0.4.13)."""
    hf_path: str
    """The Hugging Face dataset lm-eval reads, for users who fill the folder from the hub."""
    hf_name: str | None
    """Its config name, or None."""
    split: str
    """The split lm-eval evaluates: its ``test_split`` if the task has one, else ``validation_split``."""
    fields: tuple[str, ...]
    """Fields every row needs (those lm-eval's prompt, choices and target read)."""
    answer_problem: Callable[[dict], str | None] | None = None
    """What is wrong with a row's answer field, or None; catches rows lm-eval would crash on."""


TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(name="sciq", builtin_yaml="sciq/sciq.yaml", hf_path="allenai/sciq", hf_name=None, split="test",
                 fields=("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support")),
        TaskSpec(name="arc_easy", builtin_yaml="arc/arc_easy.yaml", hf_path="allenai/ai2_arc", hf_name="ARC-Easy",
                 split="test", fields=("question", "choices", "answerKey"),
                 answer_problem=lambda row: _choices_labels_problem(row, row["answerKey"])),
        TaskSpec(name="arc_challenge", builtin_yaml="arc/arc_challenge.yaml", hf_path="allenai/ai2_arc",
                 hf_name="ARC-Challenge", split="test", fields=("question", "choices", "answerKey"),
                 answer_problem=lambda row: _choices_labels_problem(row, row["answerKey"])),
        TaskSpec(name="logiqa", builtin_yaml="logiqa/logiqa.yaml", hf_path="EleutherAI/logiqa", hf_name="logiqa",
                 split="test", fields=("context", "question", "options", "label"), answer_problem=_logiqa_problem),
        # lm-eval strips OpenBookQA's answerKey before looking it up (``answerKey.lstrip()``).
        TaskSpec(name="openbookqa", builtin_yaml="openbookqa/openbookqa.yaml", hf_path="allenai/openbookqa",
                 hf_name="main", split="test", fields=("question_stem", "choices", "answerKey"),
                 answer_problem=lambda row: _choices_labels_problem(
                     row, row["answerKey"].lstrip() if isinstance(row["answerKey"], str) else row["answerKey"])),
        TaskSpec(name="boolq", builtin_yaml="super_glue/boolq/default.yaml", hf_path="aps/super_glue",
                 hf_name="boolq", split="validation", fields=("passage", "question", "label"),
                 answer_problem=_binary_label_problem),
        TaskSpec(name="hellaswag", builtin_yaml="hellaswag/hellaswag.yaml", hf_path="Rowan/hellaswag", hf_name=None,
                 split="validation", fields=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                 answer_problem=_hellaswag_problem),
        TaskSpec(name="piqa", builtin_yaml="piqa/piqa.yaml", hf_path="baber/piqa", hf_name=None, split="validation",
                 fields=("goal", "sol1", "sol2", "label"), answer_problem=_binary_label_problem),
        TaskSpec(name="winogrande", builtin_yaml="winogrande/default.yaml", hf_path="allenai/winogrande",
                 hf_name="winogrande_xl", split="validation", fields=("sentence", "option1", "option2", "answer"),
                 answer_problem=_winogrande_problem),
    )
}


def parse_tasks(text: str) -> tuple[str, ...]:
    """``paper`` → the nine tasks; ``sciq,piqa`` → those two (in the order given, duplicates dropped)."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        for task in PAPER_TASKS if name == "paper" else (name,):
            if task not in TASK_SPECS:
                raise UserError(f"--tasks: unknown task {name!r}; known: paper (all nine), {', '.join(PAPER_TASKS)}")
            if task not in names:
                names.append(task)
    if not names:
        raise UserError(f"--tasks is empty; give paper (all nine) or some of {', '.join(PAPER_TASKS)}")
    return tuple(names)


@dataclass(frozen=True, kw_only=True)
class TaskEvalConfig:
    """What ``blissctl eval --tasks`` needs; the CLI builds it from flags."""

    tasks: tuple[str, ...] = PAPER_TASKS
    """lm-eval task names, from ``parse_tasks`` (``--tasks paper``)."""
    task_data: Path
    """The folder holding ``<task>/<split>.jsonl`` (or ``.parquet``) for every task (``--task-data``)."""
    batch_size: int = 16
    """Requests (context + one choice) per forward pass."""
    device: str = "auto"
    """``cpu``, ``cuda``, or ``auto`` (CUDA when there is one)."""
    limit: int | None = None
    """At most this many examples per task (the first ones); None: all (the paper's setting)."""
    num_fewshot: int = 0
    """Examples shown before each question; 0 is the paper's zero-shot setting. Above 0 the shots come
    from ``<task>/train.jsonl``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_data", Path(self.task_data))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks:
            raise UserError("--tasks is empty")
        for task in self.tasks:
            if task not in TASK_SPECS:
                raise UserError(f"--tasks: unknown task {task!r}; known: paper (all nine), {', '.join(PAPER_TASKS)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.device not in DEVICES:
            raise UserError(f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1 (or unset for all examples), not {self.limit}")
        if self.num_fewshot < 0:
            raise UserError(f"--num-fewshot must be 0 or more, not {self.num_fewshot}")


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TaskScore:
    """One task's accuracies, as lm-eval reports them (fractions in [0, 1])."""

    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    """None where lm-eval's task has no length-normalised accuracy (BoolQ, WinoGrande)."""
    acc_norm_stderr: float | None
    n: int
    """Examples scored (after ``limit``)."""

    @property
    def score(self) -> float:
        """The figure a BLISS / MATES table lists: ``acc_norm`` where reported, else ``acc``."""
        return self.acc_norm if self.acc_norm is not None else self.acc


@dataclass(frozen=True, kw_only=True)
class TaskResults:
    """The scores of one model on the requested tasks, in the order asked."""

    tasks: tuple[TaskScore, ...]
    num_fewshot: int
    limit: int | None
    lm_eval_version: str

    @property
    def average_acc(self) -> float:
        """Mean ``acc`` over the tasks."""
        return sum(t.acc for t in self.tasks) / len(self.tasks)

    @property
    def average_score(self) -> float:
        """Mean of each task's ``score`` (acc_norm where reported, else acc): the paper's "average"."""
        return sum(t.score for t in self.tasks) / len(self.tasks)

    def by_task(self) -> dict[str, TaskScore]:
        return {t.task: t for t in self.tasks}

    def as_event(self) -> dict[str, Any]:
        """Flat figures for an ``eval`` event: ``sciq_acc``, ``sciq_acc_norm``, ``sciq_n``, ...,
        ``average_acc``, ``average_score``. Metrics a task lacks are left out, as lm-eval does."""
        event: dict[str, Any] = {
            "tasks": [t.task for t in self.tasks],
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "lm_eval_version": self.lm_eval_version,
            "average_acc": self.average_acc,
            "average_score": self.average_score,
        }
        for t in self.tasks:
            figures = {"acc": t.acc, "acc_stderr": t.acc_stderr, "acc_norm": t.acc_norm,
                       "acc_norm_stderr": t.acc_norm_stderr, "score": t.score, "n": t.n}
            event.update({f"{t.task}_{name}": value for name, value in figures.items() if value is not None})
        return event


TABLE_HEADER = ("task", "acc", "acc_norm", "score", "n")


def format_table(results: TaskResults) -> list[list[str]]:
    """Rows of the paper's table, header first, accuracies in percent: task, acc, acc_norm, score
    (acc_norm where reported, else acc), n; the last row is the average over the tasks."""

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    rows = [list(TABLE_HEADER)]
    for t in results.tasks:
        rows.append([t.task, percent(t.acc), percent(t.acc_norm), percent(t.score), str(t.n)])
    rows.append(["average", percent(results.average_acc), "", percent(results.average_score),
                 str(sum(t.n for t in results.tasks))])
    return rows


# --- the local data -----------------------------------------------------------------------------


def task_data_file(task_data: Path, task: str, split: str) -> Path:
    """``DIR/<task>/<split>.jsonl`` or ``.parquet``; a one-line error naming what is expected if neither
    (or both) is there."""
    spec = TASK_SPECS[task]
    if not task_data.is_dir():
        raise UserError(f"--task-data {task_data}: folder not found (it holds <task>/<split>.jsonl for each task)")
    found = [task_data / task / f"{split}{suffix}" for suffix in DATA_SUFFIXES]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise UserError(f"{task}: both {found[0]} and {found[1]} exist; keep one")
    if not found:
        expected = task_data / task / f"{split}.jsonl"
        source = spec.hf_path + (f" ({spec.hf_name})" if spec.hf_name else "")
        raise UserError(
            f"{task}: {expected} not found (or .parquet): the rows of {source}'s {split} split, "
            f"with fields {', '.join(spec.fields)}"
        )
    return found[0]


def _read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line or row number, row)`` of a JSON-lines or parquet file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several unrelated types on a bad file
            raise UserError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    import orjson

    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, orjson.loads(line)
            except orjson.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not a JSON object ({error})") from None


def check_task_file(task: str, path: Path) -> int:
    """Every row of ``path`` has the fields lm-eval reads for ``task`` and a usable answer; returns the
    number of rows. Checked before lm-eval starts so a bad row is one line naming it, not a traceback
    from inside a prompt template."""
    spec = TASK_SPECS[task]
    rows = 0
    for number, row in _read_rows(path):
        where = f"{path}:{number}" if path.suffix == ".jsonl" else f"{path} row {number}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be a JSON object with fields {', '.join(spec.fields)}")
        missing = [name for name in spec.fields if name not in row or row[name] is None]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)} ({task} rows need {', '.join(spec.fields)})")
        problem = spec.answer_problem(row) if spec.answer_problem else None
        if problem:
            raise UserError(f"{where}: {problem}")
        rows += 1
    if rows == 0:
        raise UserError(f"{path}: no rows ({task} needs rows with fields {', '.join(spec.fields)})")
    return rows


# --- lm-eval ------------------------------------------------------------------------------------


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401 - simple_evaluate's module, patched below
        import lm_eval.models.huggingface  # noqa: F401 - HFLM (needs accelerate)
        import lm_eval.tasks  # noqa: F401
    except ImportError as error:
        raise UserError(f"zero-shot task evaluation needs lm-eval ({error.msg}); {INSTALL_HINT}") from None
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def builtin_task_yaml(task: str, tasks_dir: Path | None = None) -> Path:
    """lm-eval's own YAML for ``task``: the known path, or else found by scanning lm-eval's tasks (a
    later lm-eval may move files); a one-line error if this lm-eval does not define the task."""
    if tasks_dir is None:
        tasks_dir = Path(_import_lm_eval().tasks.__file__).parent
    known = tasks_dir / TASK_SPECS[task].builtin_yaml
    if known.is_file() and _yaml_task_name(known) == task:
        return known
    from lm_eval.tasks._index import Kind, TaskIndex

    entry = TaskIndex.build([tasks_dir]).get(task)
    if entry is None or entry.kind is not Kind.TASK or entry.yaml_path is None:
        raise UserError(f"lm-eval {lm_eval_version()} does not define the task {task!r} (looked in {tasks_dir})")
    return Path(entry.yaml_path)


def _yaml_task_name(path: Path) -> str | None:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path, resolve_func=False, recursive=False).get("task")
    except Exception:  # a file that does not parse is simply not the definition we look for
        return None


def local_task_config(task: str, files: dict[str, Path], cache_dir: Path, builtin: Path) -> dict[str, Any]:
    """lm-eval's definition of ``task`` with its rows read from ``files`` (split → local file)."""
    eval_split = TASK_SPECS[task].split
    formats = {path.suffix for path in files.values()}
    if len(formats) > 1:
        raise UserError(f"{task}: give all its split files in one format (.jsonl or .parquet)")
    return {
        "include": str(builtin),
        "task": task,
        # no tags: the built-in ones (``ai2_arc``, ``super-glue-lm-eval-v1``) would name tasks we do not define
        "tag": None,
        "dataset_path": "json" if formats == {".jsonl"} else "parquet",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()},
                           "cache_dir": str(cache_dir)},
        "test_split": eval_split if eval_split == "test" else None,
        "validation_split": eval_split if eval_split == "validation" else None,
        "training_split": "train" if "train" in files else None,
    }


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE")
OFFLINE_CONSTANTS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
    ("evaluate.config", "HF_EVALUATE_OFFLINE"),
)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face libraries in offline mode, restored afterwards.

    The variables alone are not enough: ``huggingface_hub``, ``datasets`` and ``evaluate`` read them
    once, when first imported, so the constants of those already imported are set as well (one imported
    inside, e.g. ``evaluate`` for a metric of its own, reads the variables and stays offline)."""
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved_constants = []
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    for module_name, attribute in OFFLINE_CONSTANTS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            saved_constants.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, True)
    try:
        yield
    finally:
        for module, attribute, value in reversed(saved_constants):
            setattr(module, attribute, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet_lm_eval(lm_eval) -> Iterator[None]:
    """lm-eval's warnings about being handed a model object and about num_fewshot are expected here;
    ``git describe`` (for its results' ``git_hash``) would print "fatal: not a git repository"
    outside a checkout; the datasets progress bars repeat one line per task."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    evaluator = lm_eval.evaluator
    git_hash = getattr(evaluator, "get_git_commit_hash", None)
    if git_hash is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        if git_hash is not None:
            evaluator.get_git_commit_hash = git_hash
        if bars_were_on:
            datasets.utils.enable_progress_bars()
        logger.setLevel(level)


def check_model(model, tokenizer) -> None:
    """One line instead of a traceback from deep inside lm-eval for a model it cannot run."""
    try:
        from transformers import PreTrainedModel
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        raise UserError(f"zero-shot task evaluation needs transformers ({error.msg})") from None
    if not isinstance(model, PreTrainedModel):
        raise UserError(f"lm-eval cannot run a {type(model).__name__}: give a transformers causal language model")
    if getattr(model.config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
        raise UserError(f"lm-eval cannot run a {type(model).__name__}: not a causal language model (no LM head)")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model embeds only {rows:,}: "
            "give the tokenizer.json the model was trained with"
        )
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no end-of-text token (lm-eval needs one)")


def hf_tokenizer(tokenizer_json_path: str | os.PathLike):
    """A ``transformers.PreTrainedTokenizerFast`` from a blissctl ``tokenizer.json`` (or a folder holding
    one): ``<|endoftext|>`` as eos and bos, ``<|padding|>`` as pad when it has one (else eos)."""
    from transformers import PreTrainedTokenizerFast

    from engine.data.tokenizer import PADDING, end_of_text_id, load_tokenizer

    path = Path(tokenizer_json_path)
    if not path.exists():
        raise UserError(f"tokenizer not found: {path}")
    tokenizer = load_tokenizer(path)
    end_of_text = tokenizer.id_to_token(end_of_text_id(tokenizer))
    pad = PADDING if tokenizer.token_to_id(PADDING) is not None else end_of_text
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end_of_text, bos_token=end_of_text,
                                   pad_token=pad)


def _stderr(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _task_score(task: str, figures: dict[str, Any], n_samples: dict[str, Any]) -> TaskScore:
    acc_norm = figures.get("acc_norm,none")
    return TaskScore(
        task=task,
        acc=float(figures["acc,none"]),
        acc_stderr=_stderr(figures.get("acc_stderr,none")),
        acc_norm=None if acc_norm is None else float(acc_norm),
        acc_norm_stderr=_stderr(figures.get("acc_norm_stderr,none")),
        n=int(n_samples.get(task, {}).get("effective", 0)),
    )


def run_tasks(model, tokenizer, config: TaskEvalConfig) -> TaskResults:
    """Zero-shot (by default) accuracy of ``model`` on ``config.tasks`` with lm-eval, from local files.

    ``model``: a ``transformers`` causal LM (``engine.models.checkpoints.load_pretrained_model``); it is
    put in eval mode on ``config.device`` and left there. ``tokenizer``: a
    ``transformers.PreTrainedTokenizerFast`` (``hf_tokenizer``). Nothing is downloaded."""
    lm_eval = _import_lm_eval()
    check_model(model, tokenizer)
    files: dict[str, dict[str, Path]] = {}
    for task in config.tasks:
        eval_file = task_data_file(config.task_data, task, TASK_SPECS[task].split)
        check_task_file(task, eval_file)
        files[task] = {TASK_SPECS[task].split: eval_file}
        if config.num_fewshot > 0:
            train_file = task_data_file(config.task_data, task, "train")
            # lm-eval samples one more than the shots, to drop the question itself if drawn
            if check_task_file(task, train_file) <= config.num_fewshot:
                shots = config.num_fewshot
                raise UserError(f"{train_file}: --num-fewshot {shots} needs more than {shots} rows")
            files[task]["train"] = train_file
    device = str(resolve_device(config.device))
    model.to(device).eval()

    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="blissctl-tasks-") as scratch, hub_offline(), _quiet_lm_eval(lm_eval):
        include_dir = Path(scratch) / "tasks"
        include_dir.mkdir()
        for task in config.tasks:
            task_config = local_task_config(task, files[task], Path(scratch) / "datasets", builtin_task_yaml(task))
            (include_dir / f"{task}.yaml").write_text(yaml.safe_dump(task_config, sort_keys=False))
        manager = TaskManager(include_path=str(include_dir), include_defaults=False)
        loaded = []
        for task in config.tasks:
            try:
                loaded.append(manager.load([task])["tasks"][task])
            except Exception as error:  # datasets and lm-eval raise many types for rows they cannot use
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                eval_file = files[task][TASK_SPECS[task].split]
                raise UserError(f"{task}: lm-eval could not read {eval_file}: {message}") from error
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
        try:
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=loaded,
                task_manager=manager,
                num_fewshot=config.num_fewshot,
                limit=config.limit,
                batch_size=config.batch_size,
                log_samples=False,
            )
        except _out_of_memory_errors() as error:
            raise UserError(f"out of memory at --batch-size {config.batch_size}; try a smaller one") from error
    results = output["results"]
    n_samples = output.get("n-samples", {})
    return TaskResults(
        tasks=tuple(_task_score(task, results[task], n_samples) for task in config.tasks),
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        lm_eval_version=lm_eval_version(),
    )


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ()
