"""The math of one BLISS outer step, as small pure functions (no data loading, no optimisers).

Notation (see BLISS.md): θp proxy parameters, θs score-model parameters, s_i = score of training
sample i, P = softmax(s) over the batch, L_i = mean next-token cross-entropy of sample i,
lower objective g = Σ_i P_i L_i + γ·KL(θt ‖ θp) + λ‖θp‖², upper objective F = validation CE.

The hypergradient ∇Φ(θs) = −∇²θs,θp g · z is computed without a loop over samples, three ways:
- ``score_hypergradient`` (route ``graph``): one reverse pass through the graph of ∇θp g that the
  z-solve built anyway (P still attached to the score model), asking for θs only;
- ``per_sample_directional_losses`` (route ``jvp``): all c_i = ∇θp L_i · z at once as one forward-mode
  ``torch.func.jvp``, then one backward pass of the score model on −Σ_i P_i c_i
  (``surrogate_upper_loss``): only Σ P_i(θs) L_i(θp) depends on θs, so the scalars c_i are enough;
- ``central_difference`` (route ``fd``): the same c_i from two forward passes at θp ± εz with the fast
  attention kernels and no graph (the DARTS approximation, exact up to O(ε²)); Hessian-vector products
  for the z-solve likewise, as differences of two gradients.

Double backward and forward-mode AD need the MATH attention kernel: the fused SDPA kernels have
neither (BLISS.md, implementation notes). ``differentiable_attention()`` selects it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Params = Sequence[Tensor]


def differentiable_attention():
    """Context in which attention is built from plain ops, so HVPs and ``jvp`` work through it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token logits of a causal LM, (B, T, V)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def sequence_losses(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """L_i: mean next-token cross-entropy of each sequence over its real target tokens, (B,).

    logits (B, T, V), input_ids (B, T), attention_mask (B, T) with 1 on real tokens (right padding).
    """
    B, T, V = logits.shape
    targets = input_ids[:, 1:]  # (B, T-1)
    valid = attention_mask[:, 1:].to(torch.float32 if logits.dtype != torch.float64 else logits.dtype)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).to(valid.dtype), targets.reshape(-1), reduction="none")
    ce = ce.view(B, T - 1)
    return (ce * valid).sum(1) / valid.sum(1).clamp_min(1.0)  # (B,)


def token_kl(proxy_logits: Tensor, target_logits: Tensor, attention_mask: Tensor) -> Tensor:
    """KL(target ‖ proxy) per next-token prediction, averaged over real positions of the batch (scalar).

    Both logits (B, T, V); the target's are detached (it is frozen).
    """
    valid = attention_mask[:, 1:].to(torch.float32 if proxy_logits.dtype != torch.float64 else proxy_logits.dtype)
    log_p = F.log_softmax(proxy_logits[:, :-1].to(valid.dtype), dim=-1)  # (B, T-1, V)
    log_t = F.log_softmax(target_logits[:, :-1].detach().to(valid.dtype), dim=-1)
    kl = (log_t.exp() * (log_t - log_p)).sum(-1)  # (B, T-1)
    return (kl * valid).sum() / valid.sum().clamp_min(1.0)


def l2_penalty(params: Params) -> Tensor:
    """‖θ‖² over all tensors (scalar)."""
    return sum((p.float() if p.dtype not in (torch.float32, torch.float64) else p).pow(2).sum() for p in params)


def batch_weights(scores: Tensor, scale: float = 1.0) -> Tensor:
    """P = softmax of ``scale`` × the scores over the batch, (B,); sums to 1. Scores lie in (0, 1), so at
    the reference's scale 1 the weights of a batch differ by at most e× (``--score-scale``)."""
    return torch.softmax(scores * scale if scale != 1.0 else scores, dim=0)


def weight_entropy(weights: Tensor) -> float:
    """Entropy of the batch weights in nats: log B for uniform weights, lower when a few samples dominate."""
    w = weights.detach().double().clamp_min(1e-30)
    return float(-(w * w.log()).sum())


def lower_objective(losses: Tensor, weights: Tensor, params: Params, *, gamma: float, l2: float,
                    kl: Tensor | None = None) -> Tensor:
    """g = Σ_i P_i L_i + γ·KL + λ‖θp‖² (scalar). ``losses`` and ``weights`` are (B,)."""
    g = (weights.to(losses.dtype) * losses).sum()
    if kl is not None and gamma:
        g = g + gamma * kl
    if l2:
        g = g + l2 * l2_penalty(params)
    return g


def dot(xs: Params, ys: Params) -> Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys, strict=True))


def norm(xs: Params) -> float:
    return math.sqrt(sum(float(x.detach().double().pow(2).sum()) for x in xs))


def hessian_vector_product(grad_g: Params, params: Params, vector: Params) -> list[Tensor]:
    """H·v with H = ∇²θ g, by reverse-over-reverse through ``grad_g`` (built with ``create_graph=True``).

    The graph is kept, so the z-solve can take several products and the hypergradient reuse it.
    """
    hv = torch.autograd.grad(grad_g, params, grad_outputs=list(vector), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params, strict=True)]


def clip_per_tensor(tensors: Params, max_norm: float) -> list[Tensor]:
    """Each tensor scaled down to norm ``max_norm`` if larger (0 disables)."""
    if not max_norm:
        return list(tensors)
    out = []
    for t in tensors:
        n = t.norm()
        out.append(t * torch.clamp(max_norm / (n + 1e-12), max=1.0))
    return out


@dataclass
class ZSolve:
    """The z-solve's result and what it saw on the way (logged every outer step)."""

    z: list[Tensor]
    residual: float | None
    """‖(H + μI)z − v‖ / ‖v‖ of the last iterate the solve multiplied by H (known at no extra product;
    None when it took none)."""
    curvature: float | None
    """‖H z‖ / ‖z‖ of that iterate: the scale of H along z (None without a product)."""


def solve_z_with(hvp: Callable[[list[Tensor]], list[Tensor]], v: Params, *, steps: int, lr: float, damping: float,
                 clip: float = 0.0, init: float = 0.0, start: Params | None = None) -> ZSolve:
    """Approximately solve (H + μI) z = v by ``steps`` gradient steps z ← z − η((H + μI)z − v), with the
    products H·x from ``hvp`` (exact, or finite differences of gradients).

    z starts from the constant ``init``, or from ``start`` (the previous outer step's z, single-loop);
    each update is clipped per tensor.
    """
    z = [s.detach().clone() for s in start] if start is not None else [torch.full_like(vi, init).detach() for vi in v]
    residual = curvature = None
    for k in range(steps):
        # From z = 0 the first product is exactly 0: skip that pass (a third of the default solve).
        from_zero = k == 0 and start is None and init == 0
        hz = [torch.zeros_like(vi) for vi in v] if from_zero else hvp(z)
        update = [h.detach() + damping * zi - vi for h, zi, vi in zip(hz, z, v, strict=True)]
        if not from_zero:
            residual = z_residual(hz, z, v, damping)
            curvature = norm(hz) / max(norm(z), 1e-30)
        update = clip_per_tensor(update, clip)
        z = [zi - lr * u for zi, u in zip(z, update, strict=True)]
    return ZSolve(z=z, residual=residual, curvature=curvature)


def solve_z(grad_g: Params, params: Params, v: Params, *, steps: int, lr: float, damping: float,
            clip: float = 0.0, init: float = 0.0) -> list[Tensor]:
    """``solve_z_with`` the exact Hessian-vector products of ``grad_g`` (built with ``create_graph``)."""
    return solve_z_with(lambda x: hessian_vector_product(grad_g, params, x), v, steps=steps, lr=lr,
                        damping=damping, clip=clip, init=init).z


def cosine(xs: Params, ys: Params) -> float:
    """cos(x, y) over all tensors: how far z turned away from v (1.0: the solve only rescaled v)."""
    return float(dot([x.double() for x in xs], [y.double() for y in ys])) / max(norm(xs) * norm(ys), 1e-30)


def score_hypergradient(grad_g: Params, score_params: Params, z: Params) -> list[Tensor]:
    """∇Φ(θs) = −∇θs(∇θp g · z): one reverse pass through the graph of ∇θp g that asks for θs only
    (exact; asking for θp too would cost about one more Hessian-vector product). ``grad_g`` must have
    been built with the batch weights attached to the score model. Frees the graph."""
    grads = torch.autograd.grad(grad_g, score_params, grad_outputs=list(z), allow_unused=True)
    return [torch.zeros_like(p) if g is None else -g for g, p in zip(grads, score_params, strict=True)]


# --- finite differences: the fast kernels, no graph ---------------------------------------------------


def finite_difference_step(params: Params, direction: Params, relative: float) -> float:
    """ε for a central difference along ``direction``: ``relative`` × ‖θ‖/‖direction‖, so that the
    step moves θ by a fixed share of its size whatever the scale of z (a fixed tiny ε loses everything
    to cancellation; BLISS.md)."""
    return relative * norm(params) / max(norm(direction), 1e-30)


@contextlib.contextmanager
def moved(params: Params, direction: Params, scale: float):
    """θ + scale·direction inside the block; θ restored exactly (from a copy) after it."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(d.to(p.dtype), alpha=scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def central_difference(fn: Callable[[], Tensor | list[Tensor]], params: Params, direction: Params, relative: float):
    """(fn(θ + εd) − fn(θ − εd)) / 2ε, exact up to O(ε²): the directional derivative of ``fn`` (a
    tensor, or a list of tensors such as a gradient) along ``d`` from two evaluations, in float64."""
    eps = finite_difference_step(params, direction, relative)
    with moved(params, direction, eps):
        plus = fn()
    with moved(params, direction, -eps):
        minus = fn()
    if isinstance(plus, Tensor):
        return (plus.double() - minus.double()) / (2 * eps)
    return [(a.double() - b.double()) / (2 * eps) for a, b in zip(plus, minus, strict=True)]


def z_residual(hz: Params, z: Params, v: Params, damping: float) -> float:
    """‖(H + μI)z − v‖ / ‖v‖: how far the z-solve is from exact (1 at z = 0)."""
    r = [h + damping * zi - vi for h, zi, vi in zip(hz, z, v, strict=True)]
    return norm(r) / max(norm(v), 1e-30)


def per_sample_directional_losses(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                                  z: dict[str, Tensor], chunk: int = 0) -> tuple[Tensor, Tensor]:
    """All c_i = ∇θp L_i · z at once, as one forward-mode directional derivative: (L, c), both (B,).

    ``z`` maps parameter names of ``model`` to tangents (names absent from it get zero tangent).
    ``chunk`` > 0 runs the forward-mode pass on that many documents at a time (each c_i only depends on
    its own document, so this is exact): memory then stays flat as the batch grows.
    """
    from torch.func import functional_call, jvp

    params = {k: p.detach() for k, p in model.named_parameters()}
    tangents = {k: z[k].detach() if k in z else torch.zeros_like(p) for k, p in params.items()}

    def losses_of(ids: Tensor, mask: Tensor):
        def losses(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(model, p, args=(), kwargs={"input_ids": ids, "attention_mask": mask,
                                                              "use_cache": False})
            return sequence_losses(out.logits, ids, mask)

        return losses

    B = input_ids.shape[0]
    step = chunk if chunk > 0 else B
    values, cs = [], []
    with differentiable_attention():
        for start in range(0, B, step):
            mask = attention_mask[start : start + step]
            T = int(mask.sum(1).max())  # right padding: columns past the longest document are all padding
            ids, mask = input_ids[start : start + step, :T], mask[:, :T]
            value, c = jvp(losses_of(ids, mask), (params,), (tangents,))
            values.append(value)
            cs.append(c)
    return torch.cat(values), torch.cat(cs)


def surrogate_upper_loss(scores: Tensor, c: Tensor, scale: float = 1.0) -> Tensor:
    """−Σ_i softmax(β·s)_i · c_i with c held fixed: its gradient in θs is the hypergradient (scalar)."""
    return -(batch_weights(scores, scale) * c.detach().to(scores.dtype)).sum()
