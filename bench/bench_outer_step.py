"""One BLISS outer step against one plain proxy training step, with the outer step broken into phases.

The outer step is ``engine.bliss.train.outer_step`` itself (the code the loop runs), timed phase by
phase with its ``PhaseTimer``: K inner steps, validation gradient, score-model forward, the graph of
∇θp g (forward + create_graph backward under the MATH kernel), the z-solve (``--z-steps`` HVPs), the
hypergradient (one reverse pass through that graph) and the upper AdamW step. A plain step is forward +
backward + AdamW of the proxy on the same batch shape with the default attention kernels.

Every route (``--routes``: hypergradient route : z-solve products) is measured in the same run from the
same state, against the same plain step. Goal: with ``fd``, the work beyond the K inner steps costs at
most 3 plain steps. Recorded under ``outer_step.<route>+<products>.plain_steps_beyond_k``.

    .venv/bin/python bench/bench_outer_step.py [--proxy 14m] [--batch 32] [--seq-len 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default="14m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plain-steps", type=int, default=3)
    parser.add_argument("--outer-steps", type=int, default=2, help="the first is a warm-up and not counted")
    parser.add_argument("--routes", default="graph:exact,jvp:exact,fd:exact,fd:fd",
                        help="hypergradient route:z-solve products, comma-separated (measured in one run)")
    parser.add_argument("--z-steps", type=int, default=3)
    parser.add_argument("--z-carry", action="store_true", help="start each z-solve from the previous step's z")
    parser.add_argument("--name", default="bliss_outer_step", help="results file name")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import copy

    import torch
    from _common import record

    from engine.bliss import bilevel
    from engine.bliss.config import TrainScorerConfig
    from engine.bliss.outer_step import PhaseTimer, make_adamw, outer_step
    from engine.bliss.score_model import ScoreModel
    from engine.models.families import build_causal_lm
    from engine.models.presets import model_preset, with_max_seq_len
    from engine.runtime import autocast

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_config = with_max_seq_len(model_preset(args.proxy), args.seq_len)
    proxy0 = build_causal_lm(model_config, args.vocab, seed=0).to(device)
    score0 = ScoreModel.from_proxy(proxy0)

    def batches(seed: int):
        g = torch.Generator().manual_seed(seed)

        def batch():
            ids = torch.randint(2, args.vocab, (args.batch, args.seq_len), generator=g).to(device)
            return ids, torch.ones_like(ids)

        return batch

    # Plain proxy step: forward + backward + AdamW, default kernels.
    proxy = copy.deepcopy(proxy0)
    plain_config = TrainScorerConfig(train=("unused",), val="unused", proxy=args.proxy)
    opt = make_adamw(proxy, plain_config, model_config.lr)
    batch = batches(1)
    plain = []
    for _ in range(args.plain_steps + 1):
        ids, mask = batch()
        start = time.perf_counter()
        with autocast(device):
            loss = bilevel.sequence_losses(bilevel.lm_logits(proxy, ids, mask), ids, mask).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        plain.append(time.perf_counter() - start)
    plain_s = statistics.median(plain[1:])  # the first step warms caches
    print(f"plain step: {plain_s:.2f} s", flush=True)

    results = {}
    for route in args.routes.split(","):
        hypergrad, z_hvp = route.split(":")
        config = TrainScorerConfig(train=("unused",), val="unused", proxy=args.proxy, batch_size=args.batch,
                                   seq_len=args.seq_len, steps=100, hypergrad=hypergrad, z_hvp=z_hvp,
                                   z_steps=args.z_steps, z_carry=args.z_carry)
        proxy, score_model = copy.deepcopy(proxy0), copy.deepcopy(score0)  # every route from the same state
        opt_proxy = make_adamw(proxy, config, model_config.lr)
        opt_scorer = make_adamw(score_model, config, config.lr_scorer)
        batch = batches(2)
        timers = []
        carried = None  # --z-carry: each z-solve starts from the step before's z (the first from z_init)
        for step in range(args.outer_steps):
            timer = PhaseTimer(device)
            start = time.perf_counter()
            out = outer_step(proxy=proxy, score_model=score_model, target=None, opt_proxy=opt_proxy, opt_scorer=opt_scorer,
                       train_batches=(batch() for _ in range(config.inner_steps + 1)), val_batch=batch(),
                       config=config, gamma=0.0, step=step, lr_proxy=model_config.lr, timer=timer,
                       z_start=carried)
            timer.seconds["total"] = time.perf_counter() - start
            carried = out.z if args.z_carry else None
            timers.append(timer.seconds)
            print(f"{route} outer step {step}: " + ", ".join(f"{k} {v:.2f} s" for k, v in timer.seconds.items()),
                  flush=True)
        counted = timers[1:] or timers
        phases = {k: round(statistics.median(t[k] for t in counted), 3) for k in counted[0]}
        beyond = phases["total"] - phases["inner"]
        results[route.replace(":", "+")] = {
            "outer_step_phases_s": phases,
            "outer_step_in_plain_steps": round(phases["total"] / plain_s, 2),
            "plain_steps_beyond_k": round(beyond / plain_s, 2),
            "phases_in_plain_steps": {k: round(v / plain_s, 2) for k, v in phases.items()},
        }
    record(args.name, {
        "proxy": args.proxy, "batch": args.batch, "seq_len": args.seq_len, "vocab": args.vocab,
        "threads": args.threads, "device": args.device, "inner_steps": 5, "z_steps": args.z_steps, "z_carry": args.z_carry,
        "plain_step_s": round(plain_s, 3), "goal_plain_steps_beyond_k": {"fd": 3.0},
        "outer_step": results,
    })


if __name__ == "__main__":
    main()
