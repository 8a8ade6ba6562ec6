"""BLISS hypergradient: the batched routes against the reference's per-sample loop, time and peak memory.

Routes, all computing ∇Φ(θs) = −Σ_i c_i ∇θs softmax(s)_i with c_i = ∇θp L_i · z for one batch:

- ``reference``: the reference implementation's loop: B per-sample score-model gradients (held at once)
  and B per-sample proxy gradients.
- ``graph``: forward + ∇θp g with ``create_graph`` (the graph the z-solve builds anyway) + one reverse
  pass of ∇θp g · z into θs. ``graph_marginal`` is that last pass alone: its cost inside an outer step.
- ``jvp``: all c_i in one forward-mode ``jvp`` (MATH attention), then one score-model backward.
- ``jvp_chunked``: the same with the forward-mode pass over ``--chunk`` documents at a time (exact).
- ``fd``: all c_i by central differences, two forward passes at θp ± εz with the fast attention kernels
  and no graph (ε = ``--fd-step``·‖θp‖/‖z‖), then one score-model backward; exact up to O(ε²).

Each (route, batch) runs in a fresh process; peak memory is the process's RSS high-water mark above its
RSS after set-up (models, batch and z ready). All routes share the seed, so their hypergradients are
compared to the reference's (relative L2 error, float32).

    .venv/bin/python bench/bench_hypergradient.py [--proxy 14m] [--batch 32] [--seq-len 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ROUTES = ("reference", "graph", "jvp", "jvp_chunked", "fd")


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)


def child(args) -> None:
    import torch

    from engine.bliss import bilevel
    from engine.bliss.score_model import ScoreModel
    from engine.models.families import build_causal_lm
    from engine.models.presets import model_preset, with_max_seq_len

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = with_max_seq_len(model_preset(args.proxy), args.seq_len)
    proxy = build_causal_lm(config, args.vocab, seed=0)
    score_model = ScoreModel.from_proxy(proxy)
    proxy_params = list(proxy.parameters())
    score_params = list(score_model.parameters())
    B, T = args.batch, args.seq_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, args.vocab, (B, T), generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 1)
    z = [0.03 * torch.randn(p.shape, generator=g) / (p.numel() ** 0.5) for p in proxy_params]

    def reference():
        score_grads, scores, c = [], [], []
        for i in range(B):
            n = int(lengths[i])
            one_ids, one_mask = ids[i : i + 1, :n], mask[i : i + 1, :n]
            s_i = score_model(one_ids, one_mask)[0]
            score_grads.append([x if x is not None else torch.zeros_like(p) for x, p in
                                zip(torch.autograd.grad(s_i, score_params, allow_unused=True), score_params, strict=True)])
            scores.append(s_i.detach())
            loss_i = bilevel.sequence_losses(bilevel.lm_logits(proxy, one_ids, one_mask), one_ids, one_mask)[0]
            grad_i = torch.autograd.grad(loss_i, proxy_params)
            c.append(float(bilevel.dot(grad_i, z)))
        P = torch.softmax(torch.stack(scores), 0)
        mean = [sum(P[j] * score_grads[j][k] for j in range(B)) for k in range(len(score_params))]
        return [-sum(c[i] * P[i] * (score_grads[i][k] - mean[k]) for i in range(B)) for k in range(len(score_params))]

    marginal = []

    def graph():
        weights = bilevel.batch_weights(score_model(ids, mask))
        with bilevel.differentiable_attention():
            logits = bilevel.lm_logits(proxy, ids, mask)
            losses = bilevel.sequence_losses(logits, ids, mask)
            gval = bilevel.lower_objective(losses, weights, proxy_params, gamma=0.0, l2=1e-7)
            grad_g = torch.autograd.grad(gval, proxy_params, create_graph=True)
            t0 = time.perf_counter()
            hypergrad = bilevel.score_hypergradient(grad_g, score_params, z)  # θs only, as the loop runs it
            marginal.append(time.perf_counter() - t0)
        return hypergrad

    names = [k for k, _ in proxy.named_parameters()]

    def jvp(chunk: int = 0):
        _, c = bilevel.per_sample_directional_losses(proxy, ids, mask, dict(zip(names, z, strict=True)),
                                                     chunk=chunk)
        surrogate = bilevel.surrogate_upper_loss(score_model(ids, mask), c)
        grads = torch.autograd.grad(surrogate, score_params, allow_unused=True)
        return [x if x is not None else torch.zeros_like(p) for x, p in zip(grads, score_params, strict=True)]

    def fd():
        def sample_losses():
            with torch.no_grad():
                return bilevel.sequence_losses(bilevel.lm_logits(proxy, ids, mask), ids, mask)

        c = bilevel.central_difference(sample_losses, proxy_params, z, args.fd_step).float()
        surrogate = bilevel.surrogate_upper_loss(score_model(ids, mask), c)
        grads = torch.autograd.grad(surrogate, score_params, allow_unused=True)
        return [x if x is not None else torch.zeros_like(p) for x, p in zip(grads, score_params, strict=True)]

    fn = {"reference": reference, "graph": graph, "jvp": jvp,
          "jvp_chunked": lambda: jvp(args.chunk), "fd": fd}[args.route]
    baseline = rss_mb()
    reset_peak()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    peak = rss_mb("VmHWM") - baseline
    torch.save([r.detach() for r in result], args.out)
    figures = {"route": args.route, "batch": B, "time_s": round(min(times), 3), "times_s": [round(t, 3) for t in times],
               "peak_mb_above_setup": round(peak, 1), "setup_rss_mb": round(baseline, 1),
               "score_model_params": sum(p.numel() for p in score_params),
               "proxy_params": sum(p.numel() for p in proxy_params)}
    if marginal:
        figures["graph_marginal_s"] = round(min(marginal), 3)
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default="14m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--small-batch", type=int, default=8, help="second batch size, to see memory growth")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=4, help="documents per jvp pass of the jvp_chunked route")
    parser.add_argument("--fd-step", type=float, default=1e-3, help="finite-difference step of the fd route, × ‖θ‖/‖z‖")
    parser.add_argument("--routes", default=",".join(ROUTES), help="which routes to run")
    parser.add_argument("--route", choices=ROUTES)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.route:
        child(args)
        return

    import torch
    from _common import record

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (args.small_batch, args.batch):
            for route in args.routes.split(","):
                out = Path(tmp) / f"{route}-{batch}.pt"
                cmd = [sys.executable, __file__, "--route", route, "--out", str(out), "--proxy", args.proxy,
                       "--batch", str(batch), "--seq-len", str(args.seq_len), "--vocab", str(args.vocab),
                       "--threads", str(args.threads), "--repeats", str(args.repeats), "--chunk", str(args.chunk),
                       "--fd-step", str(args.fd_step)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[(route, batch)] = json.loads(done.stdout.strip().splitlines()[-1])
                runs[(route, batch)]["hypergradient"] = torch.load(out, weights_only=True)
                print(f"{route:>9} batch {batch:>3}: {runs[(route, batch)]['time_s']:.2f} s, "
                      f"+{runs[(route, batch)]['peak_mb_above_setup']:.0f} MB", flush=True)

    def rel(a, b) -> float:
        num = sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b, strict=True)) ** 0.5
        return num / sum(float(y.double().pow(2).sum()) for y in b) ** 0.5

    B = args.batch
    ref = runs[("reference", B)]
    figures = {
        "proxy": args.proxy, "batch": B, "seq_len": args.seq_len, "vocab": args.vocab, "threads": args.threads,
        "device": "cpu", "repeats": args.repeats, "jvp_chunk": args.chunk, "routes": {}, "ratios": {},
    }
    for (route, batch), r in runs.items():
        entry = {k: v for k, v in r.items() if k not in ("hypergradient", "route", "batch")}
        entry["rel_error_vs_reference"] = float(f"{rel(r['hypergradient'], runs[('reference', batch)]['hypergradient']):.3g}")
        figures["routes"][f"{route}@{batch}"] = entry
    for route in [r for r in ("graph", "jvp", "jvp_chunked", "fd") if (r, B) in runs]:
        r = runs[(route, B)]
        figures["ratios"][f"{route}_speedup_vs_reference"] = round(ref["time_s"] / r["time_s"], 3)
        figures["ratios"][f"{route}_peak_memory_vs_reference"] = round(
            r["peak_mb_above_setup"] / ref["peak_mb_above_setup"], 3)
    if ("graph", B) in runs:
        g = runs[("graph", B)]
        figures["ratios"]["graph_marginal_speedup_vs_reference"] = round(ref["time_s"] / g["graph_marginal_s"], 3)
    if ("fd", B) in runs and ("jvp", B) in runs:  # the figure: fd against the exact forward-mode route
        figures["ratios"]["fd_rel_error_vs_jvp"] = float(f"{rel(runs[('fd', B)]['hypergradient'], runs[('jvp', B)]['hypergradient']):.3g}")
    for route in args.routes.split(","):
        small, big = runs[(route, args.small_batch)], runs[(route, B)]
        figures["ratios"][f"{route}_memory_growth_{args.small_batch}_to_{B}"] = round(
            big["peak_mb_above_setup"] / max(small["peak_mb_above_setup"], 1e-9), 3)
    figures["median_time_s"] = statistics.median(r["time_s"] for r in runs.values())
    figures["fd_step"] = args.fd_step
    record("bliss_hypergradient", figures)


if __name__ == "__main__":
    main()
