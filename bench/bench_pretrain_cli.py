"""``blissctl pretrain`` as users run it, idle and beside one busy process, against a one-thread bare loop.

The command is the one from issue 11 (default thread choice, one process on the CPU):

    blissctl pretrain --data DATA --size tiny --seq-len 128 --micro-batch 16 --global-batch-tokens 2048
                      --steps STEPS --nproc-per-node 1 --device cpu

run as a subprocess (launcher, data preparation, the trainer: one process starts without torchrun). Its tokens/s is Δ tokens ÷
Δ time over the logged steps after the first quarter. The reference is a bare loop in a fresh process
with one torch thread on the same model and batch shape (random tokens of the same vocabulary:
forward, cross-entropy, backward, AdamW). Both are measured with the machine idle (as far as this
shared machine allows) and with one other process spinning on a core, in one run:

- ``cli_default``: no ``--threads``: the launcher reads the load and leaves busy cores alone;
- ``cli_threads_2``: ``--threads 2`` (torch's own default on two cores, what ran before);
- ``bare_1_thread``.

Goal: ``cli_default`` ÷ ``bare_1_thread`` ≥ 0.9 under load. Recorded in bench/results/pretrain_cli.json
under ``pretrain_cli.<condition>.<variant>_tokens_per_s`` and the ratios.

    .venv/bin/python bench/bench_pretrain_cli.py --data runs/demo-random/selected   # after blissctl demo
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import run_blissctl  # noqa: E402

from engine.eval.compare import read_events  # noqa: E402

BARE_LOOP = """
import sys, time
import torch
import torch.nn.functional as F
from engine.models.families import build_causal_lm
from engine.runtime import reuse_freed_memory
from engine.models.presets import model_preset, with_max_seq_len
size, seq_len, micro, vocab, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
reuse_freed_memory()  # as the trainer does: the comparison is of threads, not of the allocator
torch.manual_seed(0)
config = with_max_seq_len(model_preset(size), seq_len)
model = build_causal_lm(config, vocab, seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95))  # the trainer's betas
times = []
for step in range(steps):
    ids = torch.randint(2, vocab, (micro, seq_len + 1))
    start = time.perf_counter()
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits  # the trainer's forward and loss
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the trainer clips too
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
steady = times[len(times) // 4:]
print(micro * seq_len * len(steady) / sum(steady))
"""


def vocab_of(data: Path) -> int:
    from engine.data.tokenizer import load_tokenizer

    candidates = [data / "tokenizer.json", data.parent / "tokenizer.json"]
    for path in candidates:
        if path.exists():
            return load_tokenizer(path).get_vocab_size()
    raise SystemExit(f"no tokenizer.json beside {data}")


def cli_rate(args, runs: Path, name: str, extra: list[str]) -> dict:
    """The command with default flags (``extra`` aside); tokens/s over the steps after the first quarter,
    as Δ tokens_seen ÷ Δ time of the logged steps (the bare loop's rate is total tokens ÷ total time too)."""
    cost = run_blissctl(["pretrain", "--data", str(args.data), "--size", args.size, "--seq-len", str(args.seq_len),
                         "--micro-batch", str(args.micro_batch), "--global-batch-tokens",
                         str(args.seq_len * args.micro_batch), "--steps", str(args.steps), "--nproc-per-node", "1",
                         "--device", "cpu", "--log-every", "5", "--runs-dir", str(runs), "--run", name, *extra])
    events = read_events(runs / name, "pretrain")
    steps = [e for e in events if e.get("kind") == "step" and "tokens_seen" in e]
    first = next(e for e in steps if e["step"] > args.steps // 4)
    last = steps[-1]
    start = next(e for e in events if e.get("kind") == "start")
    plan = next((line for line in cost["output"].splitlines() if line.startswith("torch threads")), "")
    return {"tokens_per_s": round((last["tokens_seen"] - first["tokens_seen"]) / (last["ts"] - first["ts"]), 1),
            "threads": start.get("threads"), "plan": plan, "wall_s": cost["wall_s"], "user_s": cost["user_s"],
            "sys_s": cost["sys_s"]}


def bare_rate(args, vocab: int) -> float:
    out = subprocess.run([sys.executable, "-c", BARE_LOOP, args.size, str(args.seq_len), str(args.micro_batch),
                          str(vocab), str(args.steps)], capture_output=True, text=True, cwd=ROOT, check=True)
    return round(float(out.stdout.split()[-1]), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "demo-random" / "selected",
                        help="a select run's selected/ folder (default: the demo's random arm)")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from _common import record

    vocab = vocab_of(args.data)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for condition in ("idle", "busy"):
            spinner = None
            if condition == "busy":  # one other process keeping one core busy
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1.0)
            try:
                row = {}
                for name, extra in (("cli_default", []), ("cli_threads_2", ["--threads", "2"])):
                    runs = Path(tmp) / condition
                    row[name] = cli_rate(args, runs, name, extra)
                    print(condition, name, row[name], flush=True)
                    shutil.rmtree(runs / name, ignore_errors=True)
                row["bare_1_thread_tokens_per_s"] = bare_rate(args, vocab)
                print(condition, "bare loop, 1 thread:", row["bare_1_thread_tokens_per_s"], "tokens/s", flush=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            row["cli_default_over_bare_1_thread"] = round(
                row["cli_default"]["tokens_per_s"] / row["bare_1_thread_tokens_per_s"], 3)
            row["cli_threads_2_over_bare_1_thread"] = round(
                row["cli_threads_2"]["tokens_per_s"] / row["bare_1_thread_tokens_per_s"], 3)
            results[condition] = row
    record("pretrain_cli", {"command": " ".join(sys.argv), "size": args.size, "seq_len": args.seq_len,
                            "micro_batch": args.micro_batch, "steps": args.steps, "vocab": vocab,
                            "goal_busy_cli_default_over_bare_1_thread": 0.9, "pretrain_cli": results})


if __name__ == "__main__":
    main()
