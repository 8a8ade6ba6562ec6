"""What every benchmark shares: where the corpus is, and how results are recorded."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
POOL = SHARED / "corpus" / "pool"
VAL = SHARED / "corpus" / "val" / "narrative.jsonl.zst"
PYTHIA_TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
RESULTS = ROOT / "bench" / "results"


def pool_shards() -> list[Path]:
    shards = sorted(POOL.glob("*.jsonl.zst"))
    if not shards:
        raise SystemExit(f"the benchmark corpus is missing: {POOL}")
    return shards


def record(name: str, figures: dict) -> Path:
    """Write ``figures`` with the machine and time to bench/results/NAME.json and print them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **figures,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"recorded in {path.relative_to(ROOT)}")
    return path
