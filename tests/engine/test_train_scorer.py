"""``train-scorer`` end to end on tiny models: it learns what helps, resumes exactly, and fails clearly.

Toy data: clean English sentences (from the embedded narrative set) and noise made of the same
sentences with their characters shuffled; the validation set is other clean sentences.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from typer.testing import CliRunner

from blissctl.cli import app
from engine.bliss.artifacts import load_score_model
from engine.bliss.config import TrainScorerConfig
from engine.bliss.train import run_train_scorer, score_documents
from engine.data.sample import sample_val_path
from engine.data.sources import read_texts
from engine.data.stream import DocumentStream
from engine.data.tokenizer import load_tokenizer, prefix_encoder, train_bpe_tokenizer
from engine.errors import UserError
from engine.run_dir import RunDir


def _shuffled_characters(text: str, rng: random.Random) -> str:
    chars = list(text)
    rng.shuffle(chars)
    return "".join(chars)


def _write_jsonl(path, texts):
    path.write_bytes(b"".join(orjson.dumps({"text": t, "id": i}) + b"\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    sentences = [s for text in read_texts(sample_val_path()) for s in re.split(r"(?<=[.!?])\s+", text)
                 if len(s.split()) >= 8]
    rng = random.Random(0)
    rng.shuffle(sentences)
    val, clean, other = sentences[:300], sentences[300:1100], sentences[1100:1900]
    noise = [_shuffled_characters(s, rng) for s in other]
    mixed = clean[:600] + noise[:600]
    rng.shuffle(mixed)  # like C4, the pool comes in no particular order
    pool = _write_jsonl(root / "pool.jsonl", mixed)
    val_path = _write_jsonl(root / "val.jsonl", val)
    tokenizer = train_bpe_tokenizer(clean[:600] + noise[:600], 512)
    tokenizer_path = root / "tokenizer.json"
    tokenizer_path.write_text(tokenizer.to_str())
    held_out = {"clean": clean[600:800], "noise": noise[600:800]}
    return {"root": root, "pool": str(pool), "val": str(val_path), "tokenizer": str(tokenizer_path),
            "held_out": held_out}


def _config(toy, **overrides) -> TrainScorerConfig:
    base = dict(train=(toy["pool"],), val=toy["val"], tokenizer=toy["tokenizer"], proxy="tiny", steps=4,
                warmup_steps=3, inner_steps=2, seq_len=16, batch_size=4, val_batch_size=4, probe_docs=8,
                histogram_every=2, checkpoint_every=1, shuffle_buffer=64, device="cpu")
    base.update(overrides)
    return TrainScorerConfig(**base)


def _events(run: RunDir) -> list[dict]:
    return [orjson.loads(line) for line in run.events_path.read_bytes().splitlines()]


def test_toy_separation_ranks_clean_above_noise(toy, tmp_path):
    config = _config(toy, steps=12, warmup_steps=12, inner_steps=5, seq_len=32, batch_size=16, val_batch_size=16,
                     lr_scorer=1e-3, checkpoint_every=100, histogram_every=100)
    result = run_train_scorer(config, RunDir.named("toy", tmp_path))
    model, meta = load_score_model(result.score_model)
    encode = prefix_encoder(load_tokenizer(toy["tokenizer"]), 32)
    clean = score_documents(model, encode(toy["held_out"]["clean"]), meta["pad_id"], torch.device("cpu"))
    noise = score_documents(model, encode(toy["held_out"]["noise"]), meta["pad_id"], torch.device("cpu"))
    auc = (clean[:, None] > noise[None, :]).mean() + 0.5 * (clean[:, None] == noise[None, :]).mean()
    assert auc >= 0.9, f"AUC {auc:.3f}: the score model does not prefer clean text"


def _interrupt_at(kind: str, step: int):
    def on_event(event_kind: str, figures: dict) -> None:
        if event_kind == kind and figures.get("step") == step:
            raise KeyboardInterrupt

    return on_event


def test_resume_after_interruption_continues_from_the_same_state(toy, tmp_path):
    config = _config(toy)
    straight = run_train_scorer(config, RunDir.named("straight", tmp_path))

    run = RunDir.named("interrupted", tmp_path)
    with pytest.raises(KeyboardInterrupt):  # once during warm-up ...
        run_train_scorer(config, run, on_event=_interrupt_at("warmup", 2))
    with pytest.raises(KeyboardInterrupt):  # ... and once during the outer steps
        run_train_scorer(dataclasses.replace(config, resume=True), run, on_event=_interrupt_at("step", 2))
    resumed = run_train_scorer(dataclasses.replace(config, resume=True), run)

    assert resumed.steps == straight.steps == 4
    a, _ = load_score_model(straight.score_model)
    b, _ = load_score_model(resumed.score_model)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, rtol=0, atol=1e-6), name
    assert abs(resumed.loss_val - straight.loss_val) < 1e-5
    events = _events(run)
    assert [e["interrupted"] for e in events if e["kind"] == "error"] == [True, True]
    starts = [e for e in events if e["kind"] == "start"]
    assert starts[2]["resumed_at_step"] == 2


def test_events_follow_the_dashboard_contract(toy, tmp_path):
    run = RunDir.named("events", tmp_path)
    run_train_scorer(_config(toy, steps=2, warmup_steps=1), run)
    events = _events(run)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert all(e["stage"] == "train-scorer" and "ts" in e for e in events)
    step = next(e for e in events if e["kind"] == "step")
    for key in ("step", "total_steps", "loss_lower", "loss_upper", "hypergrad_norm", "z_residual",
                "weight_entropy", "steps_per_s", "lr"):
        assert isinstance(step[key], (int, float)) and np.isfinite(step[key]), key
    warmup = next(e for e in events if e["kind"] == "warmup")
    assert set(warmup) >= {"step", "total_steps", "loss"}
    histogram = next(e for e in events if e["kind"] == "histogram")
    assert len(histogram["edges"]) == 51 and len(histogram["counts"]) == 50
    assert histogram["edges"][0] == 0.0 and histogram["edges"][-1] == 1.0 and sum(histogram["counts"]) == 8
    done = events[-1]
    assert done["steps"] == 2 and done["loss_val"] > 0 and done["checkpoint"].endswith("score-model.pt")
    assert [e["fraction"] for e in events if e["kind"] == "progress"][-1] == 1.0
    assert (run.checkpoints / "proxy-warmup.pt").exists()
    assert run.read_config()["train-scorer"]["proxy"] == "tiny"


@pytest.mark.parametrize("route", ["graph", "jvp"])
def test_the_exact_routes_run_too(toy, tmp_path, route):
    run = RunDir.named(route, tmp_path)
    result = run_train_scorer(_config(toy, steps=1, warmup_steps=1, hypergrad=route, z_hvp="exact"), run)
    step = next(e for e in _events(run) if e["kind"] == "step")
    assert result.steps == 1 and step["hypergrad_norm"] > 0


def test_existing_run_needs_resume_and_resume_refuses_changed_settings(toy, tmp_path):
    run = RunDir.named("once", tmp_path)
    run_train_scorer(_config(toy, steps=1, warmup_steps=0), run)
    with pytest.raises(UserError, match="--resume"):
        run_train_scorer(_config(toy, steps=1, warmup_steps=0), run)
    with pytest.raises(UserError, match="--seq-len"):
        run_train_scorer(_config(toy, steps=1, warmup_steps=0, seq_len=32, resume=True), run)
    other_products = "fd" if _config(toy).z_hvp == "exact" else "exact"  # the method may not change mid-run
    with pytest.raises(UserError, match="--z-hvp"):
        run_train_scorer(_config(toy, steps=1, warmup_steps=0, z_hvp=other_products, resume=True), run)


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [({"steps": 0}, "--steps"), ({"inner_steps": 0}, "--inner-steps"), ({"gamma": -1.0}, "--gamma"),
     ({"z_lr": 0.0}, "--z-lr"), ({"seq_len": 1}, "--seq-len"), ({"proxy": "7b"}, "unknown model size"),
     ({"hypergrad": "loop"}, "--hypergrad"), ({"device": "tpu"}, "--device"), ({"lr_proxy": -1.0}, "--lr-proxy")],
)
def test_bad_config_values_name_the_flag(toy, overrides, flag):
    with pytest.raises(UserError, match=re.escape(flag)):
        _config(toy, **overrides)


def test_cli_bad_flags_are_one_line_errors(toy, tmp_path):
    runner = CliRunner()
    cases = [
        (["--steps", "0"], "--steps"),
        (["--proxy", "7b"], "unknown model size"),
        (["--val", str(tmp_path / "missing.jsonl")], "input not found"),
        (["--train", str(tmp_path / "nothing-*.jsonl")], "no input files match"),
        (["--target", str(tmp_path / "no-checkpoint")], "checkpoint not found"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["train-scorer", "--runs-dir", str(tmp_path), "--proxy", "tiny", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)


def test_cli_trains_and_prints_a_summary(toy, tmp_path):
    result = CliRunner().invoke(app, [
        "train-scorer", "--train", toy["pool"], "--val", toy["val"], "--tokenizer", toy["tokenizer"],
        "--run", "cli", "--runs-dir", str(tmp_path), "--proxy", "tiny", "--steps", "2", "--warmup-steps", "1",
        "--inner-steps", "1", "--seq-len", "16", "--batch-size", "4", "--val-batch-size", "4",
        "--probe-docs", "8", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "2 outer steps" in result.stdout and "score-model.pt" in result.stdout
    assert (tmp_path / "cli" / "checkpoints" / "score-model.pt").exists()
    assert (tmp_path / "cli" / "tokenizer.json").exists()


def test_document_stream_resumes_at_its_position(toy):
    encode = prefix_encoder(load_tokenizer(toy["tokenizer"]), 16)
    stream = DocumentStream([toy["root"] / "pool.jsonl"], encode, seed=3, buffer=100)
    stream.next_batch(250)
    position = dict(stream.position)
    expected = stream.next_batch(1500)  # crosses chunk and epoch boundaries
    again = DocumentStream([toy["root"] / "pool.jsonl"], encode, seed=3, buffer=100, position=position)
    assert all(np.array_equal(a, b) for a, b in zip(again.next_batch(1500), expected, strict=True))


def _fake_pretrain_run(root, vocab_size: int, tokenizer_path) -> str:
    """A pretraining run directory with one checkpoint, in the format ``engine.models.checkpoints`` writes."""
    from engine.models.checkpoints import write_checkpoint
    from engine.models.families import build_causal_lm
    from engine.models.presets import pythia_tiny

    model = build_causal_lm(pythia_tiny(), vocab_size, seed=5)
    write_checkpoint(root / "checkpoints", 10, model_state=model.state_dict(), optimizer_state={},
                     trainer_state={"step": 10}, rng_states=[], tokenizer_path=Path(tokenizer_path), keep=1,
                     meta={"model": dataclasses.asdict(pythia_tiny()), "vocab_size": vocab_size})
    return str(root)


def test_target_checkpoint_supplies_the_kl_term(toy, tmp_path):
    vocab = load_tokenizer(toy["tokenizer"]).get_vocab_size()
    target = _fake_pretrain_run(tmp_path / "pretrain", vocab, toy["tokenizer"])
    run = RunDir.named("with-target", tmp_path)
    result = run_train_scorer(_config(toy, steps=1, warmup_steps=1, target=target, tokenizer=None), run)
    start = next(e for e in _events(run) if e["kind"] == "start")
    assert result.steps == 1 and start["gamma"] == 1e-2 and start["target"] == target
    assert run.tokenizer_path.read_text() == Path(toy["tokenizer"]).read_text()  # the target's tokenizer

    other = _fake_pretrain_run(tmp_path / "pretrain-big", 2000, toy["tokenizer"])
    with pytest.raises(UserError, match="vocabulary"):
        run_train_scorer(_config(toy, steps=1, warmup_steps=0, target=other), RunDir.named("bad", tmp_path))


def test_the_finite_difference_route_trains_and_logs_what_the_z_solve_saw(toy, tmp_path):
    run = RunDir.named("fd", tmp_path)
    result = run_train_scorer(_config(toy, steps=2, warmup_steps=1, hypergrad="fd", z_hvp="fd", z_steps=3), run)
    steps = [e for e in _events(run) if e["kind"] == "step"]
    assert result.steps == 2 and all(e["hypergrad_norm"] > 0 for e in steps)
    for event in steps:  # 3 z-steps from 0 take 2 products: residual and curvature of the last iterate
        assert 0 < event["z_residual"] and event["z_curvature"] > 0 and -1 <= event["z_cos_v"] <= 1


def test_a_carried_z_resumes_exactly(toy, tmp_path):
    config = _config(toy, hypergrad="fd", z_carry=True)
    straight = run_train_scorer(config, RunDir.named("straight", tmp_path))
    run = RunDir.named("interrupted", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_train_scorer(config, run, on_event=_interrupt_at("step", 2))
    resumed = run_train_scorer(dataclasses.replace(config, resume=True), run)
    a, _ = load_score_model(straight.score_model)
    b, _ = load_score_model(resumed.score_model)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name  # the carried z is in the checkpoint


def _fake_pretrain_size_run(root, vocab_size: int, tokenizer_path, seed: int = 5) -> tuple[str, dict]:
    """A pretrain run with a ``size`` in its meta, as ``blissctl pretrain`` writes it; and its weights."""
    from engine.models.checkpoints import write_checkpoint
    from engine.models.families import build_causal_lm
    from engine.models.presets import pythia_tiny

    model = build_causal_lm(pythia_tiny(), vocab_size, seed=seed)
    write_checkpoint(root / "checkpoints", 10, model_state=model.state_dict(), optimizer_state={},
                     trainer_state={"step": 10}, rng_states=[], tokenizer_path=Path(tokenizer_path), keep=1,
                     meta={"model": dataclasses.asdict(pythia_tiny()), "vocab_size": vocab_size, "size": "tiny",
                           "seq_len": 16})
    return str(root), {k: v.clone() for k, v in model.state_dict().items()}


def test_proxy_init_skips_the_warm_up_and_starts_from_the_given_model(toy, tmp_path):
    from engine.bliss.artifacts import find_proxy_init, load_proxy_warmup, proxy_warmup_path

    vocab = load_tokenizer(toy["tokenizer"]).get_vocab_size()
    round0, weights = _fake_pretrain_size_run(tmp_path / "r0-proxy", vocab, toy["tokenizer"])
    assert find_proxy_init("r0-proxy", tmp_path).preset == "tiny"  # a run name, looked up in the runs folder
    run = RunDir.named("r1-scorer", tmp_path)
    result = run_train_scorer(_config(toy, steps=1, warmup_steps=0, proxy_init="r0-proxy", tokenizer=None), run)
    events = _events(run)
    assert result.steps == 1 and not [e for e in events if e["kind"] == "warmup"]
    # What the round was reset to is the given model, exactly (kept as this run's warmed-up proxy).
    proxy, meta = load_proxy_warmup(proxy_warmup_path(run))
    assert meta["warmup_steps"] == 0
    assert all(torch.equal(proxy.state_dict()[k], weights[k]) for k in weights)
    assert run.tokenizer_path.read_text() == Path(toy["tokenizer"]).read_text()

    # Another run's warmed-up proxy works as well; a different --proxy or --tokenizer is one line.
    again = run_train_scorer(_config(toy, steps=1, warmup_steps=0, proxy_init=str(run.root), tokenizer=None),
                             RunDir.named("from-warmup", tmp_path))
    assert again.steps == 1
    with pytest.raises(UserError, match="differs from the --proxy-init model"):
        run_train_scorer(_config(toy, steps=1, warmup_steps=0, proxy_init=round0, proxy="14m", tokenizer=None),
                         RunDir.named("bad-size", tmp_path))
    other = tmp_path / "other.json"
    other.write_text(train_bpe_tokenizer(["a b c d e f g h"] * 50, 520).to_str())
    with pytest.raises(UserError, match="not the tokenizer the --proxy-init model"):
        run_train_scorer(_config(toy, steps=1, warmup_steps=0, proxy_init=round0, tokenizer=str(other)),
                         RunDir.named("bad-tok", tmp_path))
    with pytest.raises(UserError, match="--proxy-init"):
        run_train_scorer(_config(toy, steps=1, warmup_steps=0, proxy_init=str(tmp_path / "nothing"), tokenizer=None),
                         RunDir.named("missing", tmp_path))


def test_score_init_continues_an_earlier_score_model(toy, tmp_path):
    from engine.bliss.artifacts import score_model_path

    first = RunDir.named("r1-scorer", tmp_path)
    run_train_scorer(_config(toy, steps=2), first)
    earlier, _ = load_score_model(score_model_path(first))
    # Zero steps of the outer loop would not save; one step with a tiny learning rate keeps it close.
    second = RunDir.named("r2-scorer", tmp_path)
    run_train_scorer(_config(toy, steps=1, warmup_steps=0, proxy_init=str(first.root), score_init="r1-scorer",
                             lr_scorer=1e-9, tokenizer=None), second)
    continued, _ = load_score_model(score_model_path(second))
    fresh = RunDir.named("r2-fresh", tmp_path)
    run_train_scorer(_config(toy, steps=1, warmup_steps=0, proxy_init=str(first.root), lr_scorer=1e-9,
                             tokenizer=None), fresh)
    restarted, _ = load_score_model(score_model_path(fresh))
    head = "head.weight"
    assert torch.allclose(continued.state_dict()[head], earlier.state_dict()[head], atol=1e-6)
    assert not torch.allclose(restarted.state_dict()[head], earlier.state_dict()[head], atol=1e-6)
    with pytest.raises(UserError, match="score model"):
        run_train_scorer(_config(toy, steps=1, warmup_steps=0, proxy_init=str(first.root), score_init="nope",
                                 tokenizer=None), RunDir.named("r2-bad", tmp_path))


def test_score_scale_sharpens_the_batch_weights_the_proxy_trains_on(toy, tmp_path):
    from engine.bliss.bilevel import batch_weights

    scores = torch.tensor([0.0, 1.0])
    assert (batch_weights(scores)[1] / batch_weights(scores)[0]).item() == pytest.approx(math.e)
    assert (batch_weights(scores, 5.0)[1] / batch_weights(scores, 5.0)[0]).item() == pytest.approx(math.e ** 5)
    entropy = {}
    for scale in (1.0, 200.0):
        run = RunDir.named(f"scale-{scale:g}", tmp_path)
        run_train_scorer(_config(toy, steps=2, score_scale=scale), run)
        entropy[scale] = [e["weight_entropy"] for e in _events(run) if e["kind"] == "step"][-1]
    assert entropy[200.0] < entropy[1.0] - 1e-3
    with pytest.raises(UserError, match="--score-scale"):
        _config(toy, score_scale=0.0)
