"""``run_select`` end to end on small corpora: exactness, outputs, reports, bad input, resume."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import orjson
import pytest
import zstandard

from engine.data.sources import iter_raw_lines
from engine.data.workers import TokenizeSpec, count_and_truncate
from engine.errors import UserError
from engine.run_dir import RunDir
from engine.select.config import SelectConfig
from engine.select.score_files import load_shard_scores, score_file
from engine.select.stage import run_select
from tests.conftest import PYTHIA_TOKENIZER, make_records, write_shard


def select(tmp_path, name, inputs, tokenizer, **overrides):
    settings = {"workers": 0, **overrides}
    config = SelectConfig(
        inputs=tuple(str(p) for p in inputs), tokenizer=str(tokenizer), runs_dir=str(tmp_path / "runs"), **settings
    )
    run_dir = RunDir.named(name, tmp_path / "runs")
    return run_select(config, run_dir), run_dir


def selected_lines(run_dir: RunDir) -> dict[str, list[bytes]]:
    out = {}
    for path in sorted(run_dir.selected.glob("*.jsonl.zst")):
        with open(path, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        out[path.name] = data.splitlines()
    return out


def test_keeps_exactly_what_a_full_sort_keeps_and_copies_lines_verbatim(tmp_path, corpus, small_tokenizer):
    manifest, run_dir = select(tmp_path, "r", corpus, small_tokenizer, budget="30%")
    # reference: every score file, one global sort by (score desc, shard, line), prefix under budget
    rows = []
    for shard_index, path in enumerate(sorted(corpus)):
        shard = load_shard_scores(score_file(run_dir, path.name))
        for line, score, tokens in zip(shard.lines, shard.scores, shard.tokens, strict=True):
            rows.append((-float(score), shard_index, int(line), int(tokens)))
    rows.sort()
    budget = int(sum(r[3] for r in rows) * 0.3)
    kept, used = set(), 0
    for _, shard_index, line, tokens in rows:
        if used + tokens > budget:
            break
        used += tokens
        kept.add((shard_index, line))
    assert manifest["tokens"]["kept"] == used
    assert manifest["documents"]["kept"] == len(kept)

    outputs = selected_lines(run_dir)
    for shard_index, path in enumerate(sorted(corpus)):
        wanted = [raw for line, raw in enumerate(iter_raw_lines(path)) if (shard_index, line) in kept]
        name = path.name.replace(".json.gz", ".jsonl.zst").replace(".jsonl.zst", ".jsonl.zst")
        name = name if name.endswith(".zst") else name + ".zst"
        assert outputs.get(name, []) == wanted  # same bytes, original order within the shard


def test_manifest_reports_what_was_seen_kept_and_skipped(tmp_path, small_tokenizer):
    lines = [orjson.dumps(r) for r in make_records(100, seed=5)]
    lines[3] = b'{"text": broken'
    lines[7] = b'{"title": "no text"}'
    lines[11] = b'{"text": "\xff\xfe"}'
    path = write_shard(tmp_path / "in" / "a.jsonl.zst", lines)
    manifest, run_dir = select(tmp_path, "r", [path], small_tokenizer, budget="50%")
    assert manifest["documents"]["seen"] == 97
    assert manifest["skipped"]["malformed_json"] == 1
    assert manifest["skipped"]["missing_text"] == 1
    assert manifest["skipped"]["bad_utf8"] == 1
    assert manifest["skipped"]["total"] == 3
    assert set(manifest["by_source"]) == {"web", "books"}
    assert sum(s["documents_seen"] for s in manifest["by_source"].values()) == 97
    assert sum(manifest["histogram"]["seen"]) == 97 and sum(manifest["histogram"]["kept"]) == manifest["documents"]["kept"]
    assert (run_dir.selected / "manifest.json").exists() and (run_dir.report / "select.md").exists()
    events = [orjson.loads(line) for line in run_dir.events_path.read_bytes().splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "progress" in kinds and "histogram" in kinds
    assert all({"ts", "stage", "kind"} <= set(e) for e in events)


def test_documents_without_source_have_no_source_breakdown(tmp_path, small_tokenizer):
    path = write_shard(tmp_path / "in" / "a.jsonl", make_records(50, seed=5, sources=()))
    manifest, _ = select(tmp_path, "r", [path], small_tokenizer)
    assert manifest["by_source"] == {}
    assert sum(manifest["histogram"]["seen"]) == 50


def test_gumbel_selection_ignores_worker_count_and_file_order(tmp_path, corpus, small_tokenizer):
    base, run_a = select(tmp_path, "a", corpus, small_tokenizer, temperature=1.0, seed=3, workers=0)
    _, run_b = select(tmp_path, "b", list(reversed(corpus)), small_tokenizer, temperature=1.0, seed=3, workers=2)
    _, run_c = select(tmp_path, "c", corpus, small_tokenizer, temperature=1.0, seed=4, workers=0)
    assert selected_lines(run_a) == selected_lines(run_b)
    assert selected_lines(run_a) != selected_lines(run_c)  # the seed does change the sample
    greedy, run_d = select(tmp_path, "d", corpus, small_tokenizer, temperature=0.0, seed=3)
    assert selected_lines(run_a) != selected_lines(run_d)  # and noise does change it


def test_document_unit_and_absolute_budgets(tmp_path, corpus, small_tokenizer):
    docs, _ = select(tmp_path, "docs", corpus, small_tokenizer, budget="25%", unit="docs")
    assert docs["documents"]["kept"] == 300  # 25% of 1,200
    absolute, _ = select(tmp_path, "abs", corpus, small_tokenizer, budget="5k")
    assert 5000 - 400 < absolute["tokens"]["kept"] <= 5000  # no document is longer than ~400 tokens here
    everything, run_dir = select(tmp_path, "all", corpus, small_tokenizer, budget="100M")
    assert everything["budget"]["keeps_everything"] and everything["documents"]["kept"] == 1200


def test_truncated_shard_stops_with_its_name_and_keeps_finished_shards(tmp_path, corpus, small_tokenizer):
    broken = write_shard(tmp_path / "pool" / "c4-train.00004-of-00004.jsonl.zst", make_records(3000, seed=9))
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"c4-train.00004-of-00004.jsonl.zst: .*truncated.*after line \d+"):
        select(tmp_path, "r", corpus + [broken], small_tokenizer)
    run_dir = RunDir.named("r", tmp_path / "runs")
    for path in corpus:  # shards read before the bad one keep their (valid) scores
        assert load_shard_scores(score_file(run_dir, path.name)) is not None
    assert not (run_dir.selected / "manifest.json").exists()
    events = run_dir.events_path.read_text()
    assert '"kind":"error"' in events


def test_interrupted_run_resumes_to_the_same_selection(tmp_path, corpus, small_tokenizer):
    straight, run_straight = select(tmp_path, "straight", corpus, small_tokenizer, temperature=0.5)

    def interrupt_after_first(label):
        raise KeyboardInterrupt

    config = SelectConfig(
        inputs=tuple(map(str, corpus)), tokenizer=str(small_tokenizer), workers=0, temperature=0.5,
        runs_dir=str(tmp_path / "runs"),
    )
    run_dir = RunDir.named("cut", tmp_path / "runs")
    with pytest.raises(KeyboardInterrupt):
        run_select(config, run_dir, on_shard_scored=interrupt_after_first)
    first = score_file(run_dir, sorted(corpus)[0].name)
    assert first.exists() and len(list(run_dir.scores.glob("*.npz"))) == 1
    written = first.stat().st_mtime_ns

    with pytest.raises(UserError, match="--resume"):
        run_select(config, run_dir)  # not without --resume
    resumed = run_select(SelectConfig(**{**config.__dict__, "resume": True}), run_dir)
    assert first.stat().st_mtime_ns == written  # the finished shard was not scored again
    assert selected_lines(run_dir) == selected_lines(run_straight)
    assert resumed["documents"] == straight["documents"] and resumed["tokens"] == straight["tokens"]


def test_resume_with_other_scoring_settings_is_refused(tmp_path, corpus, small_tokenizer):
    select(tmp_path, "r", corpus, small_tokenizer)
    with pytest.raises(UserError, match="seed was 0, now 1"):
        select(tmp_path, "r", corpus, small_tokenizer, seed=1, resume=True)
    # a new budget on resume re-selects from the saved scores without scoring again
    manifest, _ = select(tmp_path, "r", corpus, small_tokenizer, budget="10%", resume=True)
    assert manifest["tokens"]["kept"] <= manifest["tokens"]["seen"] * 0.1


def test_input_with_no_documents_is_a_clear_error(tmp_path, small_tokenizer):
    path = tmp_path / "in" / "empty.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(b"")
    with pytest.raises(UserError, match="no documents"):
        select(tmp_path, "r", [path], small_tokenizer)


@pytest.mark.skipif(not PYTHIA_TOKENIZER.exists(), reason="needs ../shared/tokenizers")
def test_pythia_tokenizer_works_as_a_path(tmp_path, corpus):
    manifest, run_dir = select(tmp_path, "r", corpus[:1], PYTHIA_TOKENIZER)
    assert manifest["tokens"]["seen"] > 0
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(run_dir.tokenizer_path)).get_vocab_size() > 50_000


def test_default_tokenizer_is_trained_on_the_input_and_saved(tmp_path, corpus):
    config = SelectConfig(inputs=(str(corpus[0]),), workers=0, vocab_size=600, runs_dir=str(tmp_path / "runs"))
    run_dir = RunDir.named("r", tmp_path / "runs")
    run_select(config, run_dir)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(run_dir.tokenizer_path))
    assert 256 < tokenizer.get_vocab_size() <= 600  # the corpus has few words: BPE stops early
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.token_to_id("Ġwhich") is not None  # merges learnt from this input


def test_prefix_tokenisation_matches_full_tokenisation(small_tokenizer):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(small_tokenizer))
    texts = [r["text"] * 8 for r in make_records(40, seed=11)] + ["short text"]
    spec = TokenizeSpec(tokenizer_path=str(small_tokenizer), max_tokens=64, ship_tokens=True)
    ids, counts, n_estimated = count_and_truncate(tokenizer, texts, spec)
    exact_ids, exact_counts, _ = count_and_truncate(tokenizer, texts, TokenizeSpec(**{**spec.__dict__, "exact_counts": True}))
    full = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert [list(i) for i in exact_ids] == [f[:64] for f in full]
    assert exact_counts.tolist() == [len(f) for f in full]
    assert [list(i) for i in ids] == [f[:64] for f in full]  # the scorer sees the same first tokens
    assert n_estimated > 0
    error = np.abs(counts.astype(float) - exact_counts) / exact_counts
    assert error.max() < 0.15  # extrapolated counts stay close


def test_outputs_are_written_atomically(tmp_path, corpus, small_tokenizer, monkeypatch):
    _, run_dir = select(tmp_path, "r", corpus, small_tokenizer)
    leftovers = [p for p in Path(run_dir.root).rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    for path in run_dir.selected.glob("*.zst"):  # every output is a complete zstd stream
        with open(path, "rb") as f:
            assert zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(f)).read()

    # A write that fails half-way (here: the input goes away after 50 lines) leaves the previous
    # selection's file as it was, and no temporary file behind.
    import errno

    import engine.select.writer as writer

    before = {p.name: p.read_bytes() for p in run_dir.selected.glob("*.zst")}
    real = writer.iter_raw_lines

    def failing(path, *args):
        for number, line in enumerate(real(path, *args)):
            if number == 50:
                raise OSError(errno.EIO, "input/output error")
            yield line

    monkeypatch.setattr(writer, "iter_raw_lines", failing)
    with pytest.raises(OSError):
        select(tmp_path, "r", corpus, small_tokenizer, resume=True, budget="80%")
    assert {p.name: p.read_bytes() for p in run_dir.selected.glob("*.zst")} == before
    assert [p for p in Path(run_dir.root).rglob("*") if p.name.endswith(".tmp")] == []
