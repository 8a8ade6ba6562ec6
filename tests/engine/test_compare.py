"""The comparison arithmetic behind `blissctl demo` and bench/quality.py: a wrong speed-up is a wrong claim."""

from __future__ import annotations

import orjson
import pytest

from engine.eval.compare import (
    composition,
    gpu_seconds,
    last_eval,
    loss_table,
    markdown_table,
    pretrain_curve,
    relative_speedup,
    speedup,
    stage_done,
    summarise_arms,
    tokens_to_reach,
)

RANDOM = [(100, 5.0), (200, 4.0), (300, 3.0)]


def write_events(path, events, torn_tail=False):
    data = b"".join(orjson.dumps(e) + b"\n" for e in events)
    if torn_tail:
        data += b'{"ts": 1, "stage": "pretrain", "kind": "ev'
    path.mkdir(parents=True, exist_ok=True)
    (path / "events.jsonl").write_bytes(data)


def test_tokens_to_reach_interpolates_between_measurements():
    assert tokens_to_reach(RANDOM, 3.5) == pytest.approx(250.0)
    assert tokens_to_reach(RANDOM, 4.0) == pytest.approx(200.0)
    assert tokens_to_reach(RANDOM, 6.0) == 100.0  # already there at the first measurement
    assert tokens_to_reach(RANDOM, 2.9) is None  # never reached
    assert tokens_to_reach([], 1.0) is None


def test_tokens_to_reach_takes_the_first_crossing_of_a_noisy_curve():
    noisy = [(100, 5.0), (200, 3.0), (300, 3.6), (400, 2.0)]
    assert tokens_to_reach(noisy, 3.5) == pytest.approx(175.0)


def test_speedup_is_reference_tokens_over_method_tokens_to_the_reference_final_loss():
    faster = [(100, 4.5), (200, 3.0), (300, 2.5)]
    assert speedup(RANDOM, RANDOM) == pytest.approx(1.0)
    assert speedup(RANDOM, faster) == pytest.approx(1.5)
    # 4.5 → 3.0 between 100 and 200 tokens: reaches 3.0 exactly at 200.
    slower = [(100, 5.5), (200, 4.5), (300, 3.5)]
    assert speedup(RANDOM, slower) is None  # never gets to 3.0: no speed-up to report
    assert speedup([], faster) is None


def test_speedup_uses_the_reference_own_first_crossing_when_its_curve_is_not_monotone():
    reference = [(100, 5.0), (200, 3.0), (300, 3.5)]  # final 3.5, first reached at 175 tokens
    method = [(100, 3.5), (200, 3.0), (300, 2.8)]
    assert speedup(reference, method) == pytest.approx(1.75)


def test_summarise_arms_prefers_the_eval_command_figures_and_keeps_order():
    arms = summarise_arms(
        {"bliss": [(100, 4.5), (200, 3.0), (300, 2.5)], "random": RANDOM}, reference="random",
        evals={"bliss": {"loss_val": 2.49, "bits_per_byte": 1.1, "perplexity": 12.06}, "random": None},
    )
    assert [a.name for a in arms] == ["bliss", "random"]
    assert arms[0].final_loss == 2.49 and arms[0].bits_per_byte == 1.1
    assert arms[0].speedup == pytest.approx(1.5) and arms[0].tokens_to_target == pytest.approx(200.0)
    assert arms[1].final_loss == 3.0 and arms[1].speedup == pytest.approx(1.0)
    with pytest.raises(KeyError):
        summarise_arms({"bliss": RANDOM}, reference="random")


def test_loss_table_aligns_arms_on_tokens_and_marks_gaps():
    header, rows = loss_table({"a": [(100, 5.0), (200, 4.0)], "b": [(200, 3.0), (300, 2.0)]})
    assert header == ["tokens", "a", "b"]
    assert rows == [[100, 5.0, None], [200, 4.0, 3.0], [300, None, 2.0]]
    text = markdown_table(header, rows, digits=2)
    assert text.splitlines()[0] == "| tokens | a | b |"
    assert "| 100 | 5.00 | - |" in text and "| 300 | - | 2.00 |" in text


def test_pretrain_curve_reads_eval_events_in_tokens(tmp_path):
    run = tmp_path / "lm"
    write_events(run, [
        {"ts": 1, "stage": "pretrain", "kind": "start", "global_batch_tokens": 2048},
        {"ts": 2, "stage": "pretrain", "kind": "step", "step": 10, "loss": 9.0},
        {"ts": 3, "stage": "pretrain", "kind": "eval", "step": 10, "loss_val": 8.0},
        {"ts": 4, "stage": "pretrain", "kind": "eval", "step": 20, "loss_val": 7.5},
        # resumed: step 20 evaluated again, then continued
        {"ts": 5, "stage": "pretrain", "kind": "start", "global_batch_tokens": 2048},
        {"ts": 6, "stage": "pretrain", "kind": "eval", "step": 20, "loss_val": 7.4},
        {"ts": 7, "stage": "pretrain", "kind": "eval", "step": 30, "loss_val": 7.0},
        {"ts": 8, "stage": "eval", "kind": "eval", "loss_val": 6.9, "bits_per_byte": 2.0},
    ], torn_tail=True)
    assert pretrain_curve(run) == [(20480, 8.0), (40960, 7.4), (61440, 7.0)]
    assert last_eval(run)["bits_per_byte"] == 2.0
    assert pretrain_curve(tmp_path / "missing") == []


def test_stage_done_follows_the_last_start(tmp_path):
    run = tmp_path / "r"
    write_events(run, [{"ts": 1, "stage": "pretrain", "kind": "start"}, {"ts": 2, "stage": "pretrain", "kind": "done"}])
    assert stage_done(run, "pretrain") and not stage_done(run, "select")
    write_events(run, [{"ts": 1, "stage": "pretrain", "kind": "done"}, {"ts": 2, "stage": "pretrain", "kind": "start"}])
    assert not stage_done(run, "pretrain")


def test_gpu_seconds_count_every_launch_on_cuda_times_its_gpus_and_nothing_on_a_cpu(tmp_path):
    run = tmp_path / "r"
    write_events(run, [
        {"ts": 100, "stage": "pretrain", "kind": "start", "device": "cuda:0", "world_size": 2},
        {"ts": 130, "stage": "pretrain", "kind": "eval"},  # killed here: 30 s on 2 GPUs still count
        {"ts": 200, "stage": "pretrain", "kind": "start", "device": "cuda:0", "world_size": 2},
        {"ts": 210, "stage": "pretrain", "kind": "done"},
        {"ts": 300, "stage": "select", "kind": "start", "device": "cpu", "world_size": 1},
        {"ts": 350, "stage": "select", "kind": "done"},
    ])
    assert gpu_seconds(run, "pretrain") == 2 * 30 + 2 * 10
    assert gpu_seconds(run, "select") == 0
    assert gpu_seconds(tmp_path / "nothing", "pretrain") == 0


def test_composition_is_each_source_share_of_the_kept_tokens():
    manifest = {"by_source": {
        "austen_novels": {"documents_seen": 10, "documents_kept": 9, "tokens_seen": 1000, "tokens_kept": 900},
        "python_docs_rawhtml": {"documents_seen": 50, "documents_kept": 1, "tokens_seen": 3000, "tokens_kept": 100},
        "fortunes": {"documents_seen": 5, "documents_kept": 0, "tokens_seen": 50, "tokens_kept": 0},
    }}
    assert composition(manifest) == {"austen_novels": 0.9, "python_docs_rawhtml": 0.1}
    assert composition({"by_source": {}}) == {}


def test_relative_speedup_reports_a_slowdown_below_one_instead_of_nothing():
    faster = [(100, 4.5), (200, 3.0), (300, 2.5)]
    slower = [(100, 5.5), (200, 4.5), (300, 4.0)]  # ends at 4.0, which the reference reached at 200 tokens
    assert relative_speedup(RANDOM, faster) == pytest.approx(1.5)
    assert relative_speedup(RANDOM, slower) == pytest.approx(200 / 300)
    assert relative_speedup(RANDOM, [(100, 9.0)]) is None  # worse than anything the reference measured
    assert relative_speedup([], slower) is None
