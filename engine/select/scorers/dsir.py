"""``--scorer dsir``: DSIR's hashed n-gram importance weights towards ``--val`` (Xie et al. 2023).

The standard baseline, inside the tool: the target documents (``--val``) and a sample of the pool (the
same equal share of every shard that the default tokenizer is trained on) fit the per-bucket log ratio
of unigram+bigram frequencies (``dsir_ngrams``, which reproduces PyPI ``data-selection``'s numbers);
then the reader workers weigh every document as they read it, so scoring stays one streaming pass. The
fitted model is kept in the run (``dsir-model.npz``, no pickle) for ``--resume`` and other ranks.

A document's score is ``sigmoid(log importance / scale)``, with ``scale`` the spread of the log weights
over the fitted sample: a monotone map into (0, 1), so that the top-k keeps exactly the documents with
the largest importance weights and the histograms read like every other scorer's. Documents DSIR
filters out (under 100 words) score 0. With ``--temperature`` the Gumbel noise of ``select`` applies
to log(score), as for every scorer: that is not DSIR's own resampling (``bench/dsir_baseline.py`` runs
the reference package, resampling included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.data.sources import read_texts
from engine.data.tokenizer import training_sample
from engine.errors import UserError
from engine.run_dir import atomic_write_json
from engine.select.scorers.base import DEFAULT_SEQ_LEN, ScorerContext, ShardBatch
from engine.select.scorers.dsir_ngrams import DsirModel, fit_dsir

MODEL_FILE = "dsir-model.npz"
SCALE_FILE = "dsir-model.json"
SCALE_SAMPLE_DOCS = 2000
"""Documents of the fitted sample whose log weights set the scale of the scores."""


class DsirTextScores:
    """Runs in the reader workers: texts → float32 scores in [0, 1] (picklable: the model is ~80 KB)."""

    def __init__(self, model: DsirModel, scale: float):
        self.model = model
        self.scale = scale

    def __call__(self, texts: list[str]) -> np.ndarray:
        log_w = self.model.log_importance(texts)  # -inf for documents DSIR filters out
        with np.errstate(over="ignore"):
            scores = 1.0 / (1.0 + np.exp(-log_w / self.scale))
        return np.nan_to_num(scores, nan=0.0).astype(np.float32)


class DsirScorer:
    name = "dsir"
    needs_tokens = False
    tokenizer_path = None

    def __init__(self, model: DsirModel, *, scale: float, val: str, max_tokens: int):
        self.model = model
        self.scale = scale
        self.val = val
        self.max_tokens = max_tokens
        self.text_scorer = DsirTextScores(model, scale)

    def score(self, batch: ShardBatch) -> np.ndarray:
        if batch.text_scores is None:
            raise ValueError("the dsir scorer's scores come from the reader workers (text_scorer)")
        return batch.text_scores

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "val": self.val, "scale": self.scale,
                "log_ratio_sha256": self.model.describe()["log_ratio_sha256"]}


def score_scale(model: DsirModel, texts: list[str]) -> float:
    """The spread of the log weights of ``texts`` (their standard deviation; 1 when there is none)."""
    log_w = model.log_importance(texts)
    log_w = log_w[np.isfinite(log_w)]
    spread = float(log_w.std()) if log_w.size > 1 else 0.0
    return spread if spread > 0 and np.isfinite(spread) else 1.0


def build(context: ScorerContext) -> DsirScorer:
    config, run_dir = context.config, context.run_dir
    model_path, scale_path = run_dir.root / MODEL_FILE, run_dir.root / SCALE_FILE
    fitted_on = {"val": str(Path(config.val)), "inputs": [str(shard) for shard in context.shards]}
    recorded = None
    if model_path.exists() and scale_path.exists():  # fitted by this run already (resume, other ranks)
        import orjson

        recorded = orjson.loads(scale_path.read_bytes())
    if recorded is not None and all(recorded.get(k) == v for k, v in fitted_on.items()):
        model = DsirModel.load(model_path)
        if recorded.get("log_ratio_sha256") != model.describe()["log_ratio_sha256"]:
            raise UserError(f"{scale_path} does not belong to {model_path}; run with --force to fit DSIR again")
        scale = float(recorded["scale"])
    else:  # no fit yet, or one of another target or pool (a first attempt that stopped before its config)
        target = read_texts(config.val)
        if not target:
            raise UserError(f"--val {config.val}: no target documents to fit DSIR on")
        sample = list(training_sample(context.shards, text_field=config.text_field))  # read once: fit, scale
        model = fit_dsir(sample, target)
        scale = score_scale(model, sample[:SCALE_SAMPLE_DOCS])
        model.save(model_path)
        atomic_write_json(scale_path, {"scale": scale, "log_ratio_sha256": model.describe()["log_ratio_sha256"],
                                       **fitted_on})
    return DsirScorer(model, scale=scale, val=str(config.val), max_tokens=config.seq_len or DEFAULT_SEQ_LEN)
