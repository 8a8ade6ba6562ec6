"""What a selection kept, and why: ``selected/manifest.json`` and ``report/select.md``.

``ShardSummary.of`` condenses one shard's scores and its kept mask (what crosses between ranks);
``ManifestBuilder`` adds them up in shard order into the manifest (documents and tokens seen and
kept, skip counts, composition by ``source``, score histograms, the threshold and the first document
left out). ``bench/dsir_baseline.py`` builds its reference arm's manifest with the same two pieces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from engine import __version__
from engine.data.sources import SkipCounts
from engine.select.score_files import ShardScores

HISTOGRAM_EDGES = np.round(np.linspace(0.0, 1.0, 51), 6)


def score_histogram(scores: np.ndarray) -> np.ndarray:
    """Counts of ``scores`` in the 50 bins of [0, 1] every report uses (int64)."""
    return np.histogram(np.clip(scores, 0, 1), HISTOGRAM_EDGES)[0]


@dataclass
class SourceTally:
    """Documents and tokens of one ``source``, seen and kept."""

    documents_seen: int = 0
    documents_kept: int = 0
    tokens_seen: int = 0
    tokens_kept: int = 0

    def add(self, other: SourceTally) -> None:
        self.documents_seen += other.documents_seen
        self.documents_kept += other.documents_kept
        self.tokens_seen += other.tokens_seen
        self.tokens_kept += other.tokens_kept

    def as_dict(self) -> dict[str, int]:
        return {"documents_seen": self.documents_seen, "documents_kept": self.documents_kept,
                "tokens_seen": self.tokens_seen, "tokens_kept": self.tokens_kept}


@dataclass
class ShardSummary:
    """One shard of the selection, condensed: small enough to gather from every rank."""

    label: str
    path: str
    lines: int
    documents: int
    tokens: int
    tokens_estimated_documents: int
    text_bytes: int
    skipped: dict[str, int]
    kept_documents: int
    kept_tokens: int
    min_kept_score: float | None
    histogram_seen: list[int]
    histogram_kept: list[int]
    by_source: dict[str, SourceTally] = field(default_factory=dict)
    output: str | None = None
    """The subset file written for this shard (None when it keeps nothing)."""

    @classmethod
    def of(cls, shard: ShardScores, kept: np.ndarray) -> ShardSummary:
        """The summary of ``shard`` when the documents where ``kept`` is true are kept."""
        tokens = shard.tokens.astype(np.int64)
        by_source: dict[str, SourceTally] = {}
        if len(shard.source_names) > 1:
            n_codes = len(shard.source_names)
            seen_docs = np.bincount(shard.source_codes, minlength=n_codes)
            kept_docs = np.bincount(shard.source_codes[kept], minlength=n_codes)
            seen_tokens = np.bincount(shard.source_codes, weights=tokens, minlength=n_codes)
            kept_tokens = np.bincount(shard.source_codes[kept], weights=tokens[kept], minlength=n_codes)
            for code, name in enumerate(shard.source_names):
                if seen_docs[code]:
                    by_source[name or "(none)"] = SourceTally(int(seen_docs[code]), int(kept_docs[code]),
                                                              int(seen_tokens[code]), int(kept_tokens[code]))
        return cls(
            label=shard.label, path=shard.path, lines=shard.n_lines, documents=shard.docs, tokens=int(tokens.sum()),
            tokens_estimated_documents=shard.n_estimated, text_bytes=shard.text_bytes, skipped=shard.skips,
            kept_documents=int(kept.sum()), kept_tokens=int(tokens[kept].sum()),
            min_kept_score=float(shard.scores[kept].min()) if kept.any() else None,
            histogram_seen=score_histogram(shard.scores).tolist(),
            histogram_kept=score_histogram(shard.scores[kept]).tolist(), by_source=by_source,
        )


@dataclass(frozen=True, kw_only=True)
class SelectionFacts:
    """What the manifest says about the selection as a whole (beyond its shards)."""

    run: str
    scorer: dict[str, Any]
    seed: int
    temperature: float
    unit: str
    budget_spec: str
    budget_amount: int
    pool_total: int
    keeps_everything: bool
    first_excluded: dict[str, Any] | None
    token_counting: str
    """How the token counts were made (``exact``, or exact up to the scored prefix)."""
    tokenizer: str
    world_size: int
    output_format: str = "jsonl.zst"
    output: dict[str, Any] | None = None
    """What the output format wrote: ``files`` (in ``selected/``) and its own facts (``megatron``: tokens,
    dtype, end-of-document id); None: the per-shard files of the shard summaries."""


class ManifestBuilder:
    """Adds up shard summaries, in shard order, into ``manifest.json``'s content."""

    def __init__(self, facts: SelectionFacts):
        self.facts = facts
        self.shards: list[ShardSummary] = []

    def add(self, summary: ShardSummary) -> None:
        self.shards.append(summary)

    def build(self, *, elapsed_s: float) -> dict[str, Any]:
        facts, shards = self.facts, self.shards
        skipped = SkipCounts()
        by_source: dict[str, SourceTally] = {}
        for shard in shards:
            skipped.add(SkipCounts.from_dict(shard.skipped))
            for name, tally in shard.by_source.items():
                by_source.setdefault(name, SourceTally()).add(tally)
        min_scores = [s.min_kept_score for s in shards if s.min_kept_score is not None]
        return {
            "version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run": facts.run,
            "scorer": facts.scorer,
            "seed": facts.seed,
            "temperature": facts.temperature,
            "unit": facts.unit,
            "budget": {"spec": facts.budget_spec, "amount": facts.budget_amount, "pool_total": facts.pool_total,
                       "keeps_everything": facts.keeps_everything},
            "documents": {"seen": sum(s.documents for s in shards), "kept": sum(s.kept_documents for s in shards)},
            "tokens": {
                "seen": sum(s.tokens for s in shards),
                "kept": sum(s.kept_tokens for s in shards),
                "counting": facts.token_counting,
                "estimated_documents": sum(s.tokens_estimated_documents for s in shards),
            },
            "skipped": {**skipped.as_dict(), "total": skipped.total},
            "score_threshold": min(min_scores) if min_scores else None,
            "first_excluded": facts.first_excluded,
            "by_source": {name: tally.as_dict()
                          for name, tally in sorted(by_source.items(), key=lambda item: -item[1].tokens_seen)},
            "histogram": {
                "edges": HISTOGRAM_EDGES.tolist(),
                "seen": np.sum([s.histogram_seen for s in shards], axis=0).astype(int).tolist(),
                "kept": np.sum([s.histogram_kept for s in shards], axis=0).astype(int).tolist(),
            },
            "inputs": [
                {"label": s.label, "path": s.path, "lines": s.lines, "documents": s.documents, "tokens": s.tokens,
                 "kept_documents": s.kept_documents, "kept_tokens": s.kept_tokens, "skipped": s.skipped,
                 "output": s.output}
                for s in shards
            ],
            "outputs": ([s.output for s in shards if s.output] if facts.output is None
                        else list(facts.output["files"])),
            "output_format": facts.output_format,
            **{k: v for k, v in (facts.output or {}).items() if k != "files"},
            "tokenizer": facts.tokenizer,
            "world_size": facts.world_size,
            "elapsed_s": round(elapsed_s, 2),
        }


def render_markdown(manifest: dict[str, Any]) -> str:
    """The human-readable report: totals, sources, score histogram."""
    docs, tokens = manifest["documents"], manifest["tokens"]
    lines = [
        f"# Selection report: {manifest['run']}",
        "",
        f"- scorer: `{orjson.dumps(manifest['scorer']).decode()}`, temperature {manifest['temperature']}, seed {manifest['seed']}",
        f"- budget: {manifest['budget']['spec']} of {manifest['unit']} = {manifest['budget']['amount']:,}",
        f"- documents: {docs['kept']:,} kept of {docs['seen']:,} ({_share(docs['kept'], docs['seen'])})",
        f"- tokens: {tokens['kept']:,} kept of {tokens['seen']:,} ({_share(tokens['kept'], tokens['seen'])}); {tokens['counting']}",
        f"- skipped lines: {manifest['skipped']['total']:,} "
        + ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items() if k != "total" and v),
        f"- score threshold (lowest kept score): {manifest['score_threshold']}",
        f"- output: {manifest.get('output_format', 'jsonl.zst')}, {len(manifest['outputs'])} file(s) in selected/",
        "",
    ]
    if manifest["by_source"]:
        lines += ["| source | docs seen | docs kept | tokens seen | tokens kept | share kept |", "|---|---:|---:|---:|---:|---:|"]
        for name, f in manifest["by_source"].items():
            lines.append(
                f"| {name} | {f['documents_seen']:,} | {f['documents_kept']:,} | {f['tokens_seen']:,} | "
                f"{f['tokens_kept']:,} | {_share(f['tokens_kept'], f['tokens_seen'])} |"
            )
        lines.append("")
    lines += ["Score histogram (documents seen / kept):", "", "```"]
    edges, seen, kept = manifest["histogram"]["edges"], manifest["histogram"]["seen"], manifest["histogram"]["kept"]
    peak = max(max(seen), 1)
    for i, (s, k) in enumerate(zip(seen, kept, strict=True)):
        if s:
            bar = "#" * max(1, round(30 * s / peak))
            lines.append(f"{edges[i]:.2f}-{edges[i + 1]:.2f} {s:>9,} {k:>9,} {bar}")
    lines += ["```", ""]
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
