"""What every benchmark shares: where the corpus is, how a ``blissctl`` command is run and timed as
users run it, kept sets, and how results are recorded."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
POOL = SHARED / "corpus" / "pool"
VAL = SHARED / "corpus" / "val" / "narrative.jsonl.zst"
PYTHIA_TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
RESULTS = ROOT / "bench" / "results"
SELECTION_SHARDS = str(POOL / "c4-train.0000[0-3]-of-00008.jsonl.zst")
"""The pool of a second-target run: half of the shards, so that the target's documents are not in it."""
HOLDOUT_SHARDS = str(POOL / "c4-train.0000[4-7]-of-00008.jsonl.zst")
"""Where a second target's documents come from (``second_target``)."""


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


def run_blissctl(args: list[str], *, log: Path | None = None, threads: int | None = None,
                 env: dict[str, str] | None = None, tree: Path = ROOT) -> dict:
    """``python -m blissctl ARGS`` as users run it (``run_command``)."""
    return run_command([sys.executable, "-m", "blissctl", *args], log=log, threads=threads, env=env, tree=tree)


def run_command(argv: list[str], *, log: Path | None = None, threads: int | None = None,
                env: dict[str, str] | None = None, tree: Path = ROOT) -> dict:
    """``argv`` to completion; its output appended to ``log`` (or returned as ``output``). Wall seconds,
    and the user and system seconds of it and its children (``wait4``: this command's own, even with
    other commands running). ``threads`` sets ``OMP_NUM_THREADS``, ``env`` adds variables. ``tree`` is
    the checkout whose code runs (first on ``PYTHONPATH``, and the working folder): another commit's
    worktree runs that commit's code with this environment. Exits on failure."""
    env = {**os.environ, **(env or {})}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started = time.perf_counter()
    with open(log, "ab") if log is not None else open(os.devnull, "wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink if log is not None else subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=tree)
        output = proc.stdout.read().decode(errors="replace") if proc.stdout is not None else ""
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed ({code}): {shlex.join(argv)}" + (f"; see {log}" if log else f"\n{output}"))
    return {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2), "command": shlex.join(argv),
            # the largest peak RSS of the command and the children it waited for (Linux: kilobytes)
            "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "output": output}


def kept_lines(run: Path) -> set[str]:
    """The kept documents of a select run, by the hash of their line (lines are copied byte for byte)."""
    from engine.data.sources import iter_raw_lines

    return {hashlib.sha1(line).hexdigest() for path in sorted((run / "selected").glob("*.jsonl.zst"))
            for line in iter_raw_lines(path) if line}


def overlap(kept: set, reference: set) -> tuple[float, float]:
    """(share of ``reference`` that ``kept`` holds, Jaccard)."""
    both = len(kept & reference)
    return round(both / max(len(reference), 1), 4), round(both / max(len(kept | reference), 1), 4)


def split_val(work: Path) -> tuple[Path, Path]:
    """Alternate passages: even ones are the selection target, odd ones are held out for evaluation."""
    import zstandard

    target, held_out = work / "val-target.jsonl.zst", work / "val-eval.jsonl.zst"
    if not (target.exists() and held_out.exists()):
        raw = zstandard.ZstdDecompressor().stream_reader(open(VAL, "rb")).read()
        lines = [line for line in raw.split(b"\n") if line.strip()]
        for path, part in ((target, lines[0::2]), (held_out, lines[1::2])):
            path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(part) + b"\n"))
    return target, held_out


def second_target(work: Path, source: str, holdout: str, documents: int) -> tuple[Path, Path]:
    """Target B: the first ``documents`` documents of ``source`` in the held-out shards, alternately target
    and evaluation."""
    import orjson
    import zstandard

    from engine.data.sources import discover_shards, read_documents

    target, held_out = work / f"B-{source}-target.jsonl.zst", work / f"B-{source}-eval.jsonl.zst"
    if not (target.exists() and held_out.exists()):
        lines = []
        for doc in read_documents(discover_shards(holdout)):
            if doc.record.get("source") == source:
                lines.append(orjson.dumps({"text": doc.text, "source": source}))
                if len(lines) >= documents:
                    break
        if len(lines) < 20:
            raise SystemExit(f"only {len(lines)} documents of source {source!r} in {holdout}")
        for path, part in ((target, lines[0::2]), (held_out, lines[1::2])):
            path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(part) + b"\n"))
    return target, held_out


def add_target_arguments(parser) -> None:
    """The quality benches' choice of target: the narrative passages, or (``--target-source``) a second one."""
    parser.add_argument("--target-source", default=None,
                        help="a second target instead of the narrative passages: documents of this source")
    parser.add_argument("--holdout", default=HOLDOUT_SHARDS,
                        help="shards, not in --pool, that --target-source's documents come from")
    parser.add_argument("--target-documents", type=int, default=400)


def target_files(args, work: Path) -> tuple[Path, Path]:
    """(target, held-out) files in ``work`` for ``add_target_arguments``' flags."""
    if args.target_source:
        return second_target(work, args.target_source, args.holdout, args.target_documents)
    return split_val(work)
