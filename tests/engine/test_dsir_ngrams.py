"""DSIR's hashed n-gram importance weights: the reference's numbers, deterministic, safe to load, bounded."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import engine.select.scorers.dsir_ngrams as dsir
from engine.errors import UserError
from engine.select.scorers.dsir_ngrams import (
    DsirConfig,
    DsirModel,
    count_hashed_ngrams,
    document_words,
    fit_dsir,
    hashed_ngram_counts,
    sha256_buckets,
)
from tests.conftest import POOL_DIR, SHARED, make_records

ROOT = Path(__file__).resolve().parents[2]
VAL_TARGET = SHARED / "corpus" / "val" / "narrative.jsonl.zst"

STORY_WORDS = ("she walked slowly through the dark forest and remembered her mother s voice calling "
               "him home the old house stood silent while rain fell on the river they laughed cried "
               "whispered dreamed of summer nights long ago").split()
CODE_WORDS = ("def return import numpy array int float config parser error value index buffer "
              "function class self none true false http json server request response status").split()

# Characters where tokenisers disagree: ASCII separators, non-ASCII spaces, combining marks, numerals
# that are not digits, case folding that changes length, CJK, emoji, a lone surrogate.
TRICKY_CHARS = ([chr(i) for i in range(128)] + list("\u00a0\u2009\u3000\u2028\u200b\u0301\u0308\u093f")
                + list("²½Ⅻ٣éÉßİK€“”—…中文字😀") + ["\ud800"])


def prose(rng: random.Random, vocabulary: list[str], n_words: int) -> str:
    sentences, words = [], []
    for _ in range(n_words):
        words.append(rng.choice(vocabulary))
        if len(words) >= rng.randint(6, 14):
            sentences.append(" ".join(words).capitalize() + ".")
            words = []
    return " ".join(sentences + ([" ".join(words)] if words else []))


def tricky_text(rng: random.Random, n_chars: int) -> str:
    return "".join(rng.choice(TRICKY_CHARS) if rng.random() < 0.3 else rng.choice("ab cd, ef. g") for _ in range(n_chars))


def story_and_code_model(config: DsirConfig | None = None) -> tuple[DsirModel, list[str], list[str]]:
    rng = random.Random(0)
    stories = [prose(rng, STORY_WORDS, rng.randint(120, 300)) for _ in range(60)]
    code = [prose(rng, CODE_WORDS, rng.randint(120, 300)) for _ in range(60)]
    target = [prose(rng, STORY_WORDS, 200) for _ in range(20)]
    return fit_dsir(stories + code, target, config or DsirConfig()), stories, code


def corpus_sample(raw_docs: int, target_docs: int) -> tuple[list[str], list[str]]:
    """A few real documents when the shared corpus is here, synthetic ones with tricky characters always."""
    rng = random.Random(7)
    raw = [tricky_text(rng, rng.randint(0, 900)) for _ in range(40)] + [r["text"] for r in make_records(60, seed=3)]
    target = [tricky_text(rng, 600) for _ in range(10)] + [r["text"] for r in make_records(20, seed=4)]
    shards = sorted(POOL_DIR.glob("*.jsonl.zst"))
    if shards and VAL_TARGET.is_file():
        from engine.data.sources import read_texts

        raw += read_texts(shards[0], limit=raw_docs)
        target += read_texts(VAL_TARGET, limit=target_docs)
    return raw, target


# --- the reference's featurisation, reproduced exactly ---------------------------------------------


@pytest.mark.parametrize("num_buckets", [1, 7, 10_000, 65_536, 1 << 24])
def test_bucket_is_the_integer_value_of_the_sha256_digest_modulo_buckets(num_buckets):
    features = [f"w{i} x{i * 7919}".encode() for i in range(500)] + ["é 中".encode(), b""]
    expected = [int(hashlib.sha256(f).hexdigest(), 16) % num_buckets for f in features]
    assert sha256_buckets(features, num_buckets).tolist() == expected


def test_ascii_shortcut_tokenises_every_ascii_character_as_the_unicode_pattern_does():
    for code in range(128):
        text = f"ab{chr(code)}cd {chr(code)}{chr(code)}!x"
        assert dsir.ASCII_WORD_PUNCT.findall(text.encode()) == [w.encode() for w in dsir.WORD_PUNCT.findall(text)]


def test_tokens_are_nltk_wordpunct_of_the_lower_cased_text():
    nltk_tokenize = pytest.importorskip("nltk.tokenize")
    tokenize = nltk_tokenize.WordPunctTokenizer().tokenize
    rng = random.Random(1)
    texts = [tricky_text(rng, rng.randint(0, 300)) for _ in range(300)]
    texts += ["Don't STOP—it's 3.14! Café naïve x²y, ½ İstanbul\u00a0K\u212a", "", "   ", "a\u0301b"]
    for text in texts:
        expected = [w.encode("utf-8", "surrogatepass") for w in tokenize(text.lower())]
        assert document_words(text, max_chars=10**9) == expected, text


@pytest.mark.parametrize("ngrams", [1, 2, 3])
def test_feature_vectors_equal_the_reference_ones(ngrams):
    reference = pytest.importorskip("data_selection.hashed_ngram_dsir")
    rng = random.Random(2)
    texts = [r["text"] for r in make_records(30, seed=5)] + [tricky_text(rng, 400) for _ in range(20)]
    texts = [t.replace("\ud800", "") for t in texts]  # the reference cannot UTF-8 encode a lone surrogate
    ours = hashed_ngram_counts(texts, DsirConfig(ngrams=ngrams, num_buckets=1000))
    theirs = np.stack([reference.get_ngram_counts(t, n=ngrams, num_buckets=1000) for t in texts])
    assert np.array_equal(ours, theirs)


def test_fit_and_weights_equal_the_reference_on_a_corpus_sample(tmp_path):
    data_selection = pytest.importorskip("data_selection")
    raw, target = corpus_sample(raw_docs=300, target_docs=150)
    raw, target = [t.replace("\ud800", "") for t in raw], [t.replace("\ud800", "") for t in target]
    texts = {"raw": raw, "target": target}

    def load(name):
        return ({"text": text} for text in texts[name])

    reference = data_selection.HashedNgramDSIR(["raw"], ["target"], cache_dir=str(tmp_path / "cache"),
                                               raw_load_dataset_fn=load, target_load_dataset_fn=load, num_proc=1)
    reference.fit_importance_estimator(num_tokens_to_fit="auto")
    reference.compute_importance_weights()
    their_weights = np.load(tmp_path / "cache" / "log_importance_weights" / "0.npy")
    their_eligible = reference.perexample_metadata_filter(np.load(tmp_path / "cache" / "perexample_metadata" / "0.npy"))

    model = fit_dsir(raw, target)
    weighed = model.weigh(raw)
    assert np.array_equal(model.log_ratio, reference.log_diff)  # same elementwise arithmetic, same bits
    np.testing.assert_allclose(weighed.log_importance, their_weights, rtol=1e-12, atol=1e-9)  # sums reordered
    assert np.array_equal(weighed.eligible, their_eligible)
    assert 0 < weighed.eligible.sum() < len(raw)  # the filter was exercised both ways


def test_raw_feature_budget_stops_where_the_reference_stops(tmp_path):
    data_selection = pytest.importorskip("data_selection")
    raw = [r["text"] for r in make_records(80, seed=6)]
    target = [r["text"] for r in make_records(10, seed=8)]
    texts = {"raw": raw, "target": target}

    def load(name):
        return ({"text": text} for text in texts[name])

    reference = data_selection.HashedNgramDSIR(["raw"], ["target"], cache_dir=str(tmp_path), num_buckets=100,
                                               raw_load_dataset_fn=load, target_load_dataset_fn=load, num_proc=1)
    reference.fit_importance_estimator(num_tokens_to_fit=20 * 100)
    model = fit_dsir(raw, target, DsirConfig(num_buckets=100, raw_features_per_bucket=20))
    assert np.array_equal(model.log_ratio, reference.log_diff)
    assert 1 < model.fit.raw_documents < len(raw)


# --- what a user of the scorer relies on ---------------------------------------------------------


def test_documents_like_the_target_weigh_more_than_unrelated_ones():
    model, stories, code = story_and_code_model()
    story_weights, code_weights = model.log_importance(stories), model.log_importance(code)
    assert np.isfinite(story_weights).all() and np.isfinite(code_weights).all()
    assert story_weights.min() > code_weights.max()


def test_min_words_filter_is_the_reference_length_and_gives_minus_infinity():
    model, _, _ = story_and_code_model()
    exactly = " ".join(["forest"] * 98) + " home."  # 98 + 1 words + 1 punctuation token = 100
    short = " ".join(["forest"] * 98) + " home"  # 99
    weighed = model.weigh([exactly, short, ""])
    assert weighed.length.tolist() == [100, 99, 0]
    assert weighed.eligible.tolist() == [True, False, False]
    assert weighed.log_importance[2] == 0.0
    weights = model.log_importance([exactly, short])
    assert np.isfinite(weights[0]) and weights[1] == -np.inf


def test_weights_do_not_depend_on_batching_or_on_the_memo_starting_over(monkeypatch):
    model, stories, code = story_and_code_model()
    texts = stories + code
    together = model.log_importance(texts)
    one_by_one = np.concatenate([model.log_importance([t]) for t in texts])
    assert together.tobytes() == one_by_one.tobytes()
    # A memo a few entries large starts over every batch: same bits.
    monkeypatch.setattr(dsir, "MAX_MEMO_WORDS", 5)
    monkeypatch.setattr(dsir, "BIGRAM_TABLE_LOG2_SLOTS", 6)
    monkeypatch.setattr(dsir, "FEATURIZE_BATCH_DOCS", 3)
    fresh = DsirModel(config=model.config, log_ratio=model.log_ratio, fit=model.fit)
    assert fresh.log_importance(texts).tobytes() == together.tobytes()


def test_weights_are_bit_identical_in_other_processes(tmp_path):
    model, stories, code = story_and_code_model()
    model.save(tmp_path / "model.npz")
    (tmp_path / "texts.json").write_text(json.dumps(stories[:10] + code[:10]))
    script = ("import json, sys; from engine.select.scorers.dsir_ngrams import DsirModel; "
              "m = DsirModel.load(sys.argv[1]); t = json.load(open(sys.argv[2])); "
              "print(m.log_importance(t).tobytes().hex())")
    digests = set()
    for seed in ("1", "2"):  # Python's str hash differs between these processes
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.npz"), str(tmp_path / "texts.json")],
                             env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert digests == {model.log_importance(stories[:10] + code[:10]).tobytes().hex()}


def test_a_huge_document_costs_what_its_first_max_chars_cost():
    model, stories, _ = story_and_code_model()
    model.log_importance(stories[:2])  # allocate the memo before measuring
    huge = (stories[0] + " ") * (20_000_000 // len(stories[0]))  # ~20 MB of text
    tracemalloc.start()
    started = time.perf_counter()
    weighed = model.weigh([huge])
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 50_000_000
    assert weighed.log_importance.tobytes() == model.weigh([huge[: model.config.max_chars]]).log_importance.tobytes()


def test_save_then_load_gives_identical_weights(tmp_path):
    model, stories, code = story_and_code_model(DsirConfig(num_buckets=4096, min_words=50))
    path = tmp_path / "dsir.npz"
    model.save(path)
    loaded = DsirModel.load(path)
    assert loaded.config == model.config and loaded.fit == model.fit
    assert loaded.describe() == model.describe()
    assert loaded.log_importance(stories + code).tobytes() == model.log_importance(stories + code).tobytes()


def test_model_pickles_small_for_worker_processes():
    model, stories, _ = story_and_code_model()
    before = model.log_importance(stories)  # fills the memo, which must stay behind
    blob = pickle.dumps(model)
    assert len(blob) < 200_000
    assert pickle.loads(blob).log_importance(stories).tobytes() == before.tobytes()


class _PlantedPayload:
    """Unpickling this creates a file: proof that a loader ran code from the model file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _model_file(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "model.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _valid_metadata(model: DsirModel, **changes) -> np.ndarray:
    return np.array(json.dumps({"format": "blissctl-dsir", "version": 1, **model.describe(), **changes}))


def test_load_refuses_foreign_files_with_one_line(tmp_path):
    model, _, _ = story_and_code_model()
    good = tmp_path / "good.npz"
    model.save(good)
    cases = {
        "missing": tmp_path / "absent.npz",
        "text": tmp_path / "notes.txt",
        "empty": tmp_path / "empty.npz",
        "truncated": tmp_path / "truncated.npz",
        "bare array": tmp_path / "array.npy",
    }
    cases["text"].write_text("not a model\n")
    cases["empty"].write_bytes(b"")
    cases["truncated"].write_bytes(good.read_bytes()[:300])
    np.save(cases["bare array"], model.log_ratio)
    bad_archives = {
        "wrong keys": {"weights": model.log_ratio},
        "wrong format": {"log_ratio": model.log_ratio, "metadata": _valid_metadata(model, format="other")},
        "wrong version": {"log_ratio": model.log_ratio, "metadata": _valid_metadata(model, version=99)},
        "wrong shape": {"log_ratio": model.log_ratio[:10], "metadata": _valid_metadata(model)},
        "tampered": {"log_ratio": model.log_ratio + 1.0, "metadata": _valid_metadata(model)},
        "bad config": {"log_ratio": model.log_ratio, "metadata": _valid_metadata(model, config={"num_buckets": -1})},
        "not json": {"log_ratio": model.log_ratio, "metadata": np.array("{oops")},
    }
    for name, arrays in bad_archives.items():
        (tmp_path / name).mkdir()
        cases[name] = _model_file(tmp_path / name, **arrays)
    for name, path in cases.items():
        with pytest.raises(UserError) as caught:
            DsirModel.load(path)
        message = str(caught.value)
        assert str(path) in message and "\n" not in message, name


def test_load_never_unpickles_a_planted_file(tmp_path):
    marker = tmp_path / "code-ran"
    planted = tmp_path / "pickle.npz"
    planted.write_bytes(pickle.dumps(_PlantedPayload(marker)))
    object_array = np.empty(1, dtype=object)
    object_array[0] = _PlantedPayload(marker)
    (tmp_path / "inner").mkdir()
    inside_npz = _model_file(tmp_path / "inner", log_ratio=object_array, metadata=object_array)
    for path in (planted, inside_npz):
        with pytest.raises(UserError):
            DsirModel.load(path)
    assert not marker.exists()


def test_save_writes_atomically_and_leaves_no_temporary(tmp_path):
    model, _, _ = story_and_code_model()
    model.save(tmp_path / "dsir.npz")
    model.save(tmp_path / "dsir.npz")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dsir.npz"]


# --- fitting ---------------------------------------------------------------------------------------


def test_feature_budget_keeps_the_document_that_crosses_it():
    texts = [prose(random.Random(i), STORY_WORDS, 50) for i in range(10)]
    config = DsirConfig()
    per_doc = hashed_ngram_counts(texts, config).sum(axis=1)
    budget = int(per_doc[:3].sum()) + 1  # crossed by the fourth document
    counts = count_hashed_ngrams(iter(texts), config, feature_budget=budget)
    assert counts.documents == 4 and counts.features == int(per_doc[:4].sum())
    assert np.array_equal(counts.counts, hashed_ngram_counts(texts[:4], config).sum(axis=0))


def test_fitting_streams_a_generator_and_counts_every_document():
    raw = (prose(random.Random(i), STORY_WORDS + CODE_WORDS, 40) for i in range(1500))  # ~3 batches
    model = fit_dsir(raw, [prose(random.Random(0), STORY_WORDS, 80)])
    assert model.fit.raw_documents == 1500 and model.fit.target_documents == 1


def test_fitting_on_no_words_is_a_user_error():
    with pytest.raises(UserError, match="target"):
        fit_dsir(["some words here"], ["", "   "])
    with pytest.raises(UserError, match="raw"):
        fit_dsir([], ["some words here"])


@pytest.mark.parametrize("field, value", [("num_buckets", 0), ("ngrams", 0), ("min_words", -1), ("max_chars", 0),
                                          ("raw_features_per_bucket", 0), ("pseudo_probability", 0.0)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DsirConfig(**{field: value})


def test_scoring_nothing_returns_empty_arrays():
    model, _, _ = story_and_code_model()
    weighed = model.weigh([])
    assert weighed.log_importance.shape == weighed.length.shape == weighed.eligible.shape == (0,)
