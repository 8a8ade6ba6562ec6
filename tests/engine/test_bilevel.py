"""The bilevel math of BLISS checked against honest references, in float64 on a tiny proxy.

- A Hessian-vector product equals a central finite difference of gradients.
- The batched hypergradient (both routes: one reverse pass through the graph of ∇θp g, and ``jvp`` +
  one score-model backward) equals a plain loop of per-sample gradients of both models, as the
  reference implementation computes it.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.bliss import bilevel
from engine.bliss.score_model import ScoreModel
from engine.models.families import build_causal_lm
from engine.models.presets import pythia_tiny

VOCAB = 128


LENGTHS = [12, 7, 10, 4, 12, 9]  # right-padded to 12: padding must not change any sample's loss or score


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    proxy = build_causal_lm(pythia_tiny(), VOCAB, seed=seed).double()
    target = build_causal_lm(pythia_tiny(), VOCAB, seed=seed + 1).double().eval()
    # Perturb the score model away from the proxy so that its gradients are generic.
    score_model = ScoreModel.from_proxy(proxy).double()
    with torch.no_grad():
        for p in score_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    B, T = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(2, VOCAB, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 1)  # pad id
    val_ids = torch.randint(2, VOCAB, (3, 10))
    val_mask = torch.ones_like(val_ids)
    return proxy, target, score_model, ids, mask, val_ids, val_mask


def _grad_g(proxy, target, weights, ids, mask, *, gamma=1e-2, l2=1e-3):
    params = list(proxy.parameters())
    with bilevel.differentiable_attention():
        logits = bilevel.lm_logits(proxy, ids, mask)
        with torch.no_grad():
            target_logits = bilevel.lm_logits(target, ids, mask)
        losses = bilevel.sequence_losses(logits, ids, mask)
        kl = bilevel.token_kl(logits, target_logits, mask)
        g = bilevel.lower_objective(losses, weights, params, gamma=gamma, l2=l2, kl=kl)
        return torch.autograd.grad(g, params, create_graph=True)


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / den


def test_sequence_losses_ignore_padding():
    proxy, _, _, ids, mask, _, _ = _setup()
    with torch.no_grad():
        batched = bilevel.sequence_losses(bilevel.lm_logits(proxy, ids, mask), ids, mask)
        for i, n in enumerate(LENGTHS):
            one = bilevel.sequence_losses(bilevel.lm_logits(proxy, ids[i:i + 1, :n], mask[i:i + 1, :n]),
                                          ids[i:i + 1, :n], mask[i:i + 1, :n])
            assert torch.allclose(batched[i], one[0], rtol=1e-10, atol=0)


def test_hessian_vector_product_matches_finite_difference():
    proxy, target, score_model, ids, mask, _, _ = _setup()
    params = list(proxy.parameters())
    with torch.no_grad():
        weights = bilevel.batch_weights(score_model(ids, mask))
    grad_g = _grad_g(proxy, target, weights, ids, mask)
    u = [torch.randn_like(p) for p in params]
    hu = bilevel.hessian_vector_product(grad_g, params, u)

    # Central difference of gradients along u, with a step scaled to ‖θ‖/‖u‖ (a fixed tiny step
    # loses everything to cancellation).
    eps = 1e-5 * bilevel.norm(params) / bilevel.norm(u)

    def grad_at(shift: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, d in zip(params, u, strict=True):
                p.add_(shift * d)
        try:
            return [g.detach() for g in _grad_g(proxy, target, weights, ids, mask)]
        finally:
            with torch.no_grad():
                for p, d in zip(params, u, strict=True):
                    p.sub_(shift * d)

    plus, minus = grad_at(eps), grad_at(-eps)
    fd = [(a - b) / (2 * eps) for a, b in zip(plus, minus, strict=True)]
    assert _rel(hu, fd) < 1e-6


def _per_sample_reference(proxy, score_model, ids, mask, z):
    """The reference implementation's loop: per-sample gradients of both models (2B backward passes)."""
    proxy_params = list(proxy.parameters())
    score_params = list(score_model.parameters())
    scores, score_grads, c = [], [], []
    for i, n in enumerate(LENGTHS):
        one_ids, one_mask = ids[i:i + 1, :n], mask[i:i + 1, :n]
        s_i = score_model(one_ids, one_mask)[0]
        score_grads.append(torch.autograd.grad(s_i, score_params, allow_unused=True))
        scores.append(s_i.detach())
        with bilevel.differentiable_attention():
            loss_i = bilevel.sequence_losses(bilevel.lm_logits(proxy, one_ids, one_mask), one_ids, one_mask)[0]
        grad_i = torch.autograd.grad(loss_i, proxy_params)
        c.append(float(sum((g * zz).sum() for g, zz in zip(grad_i, z, strict=True))))
    score_grads = [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, score_params, strict=True)]
                   for gs in score_grads]
    P = torch.softmax(torch.stack(scores), 0)
    mean_grad = [sum(P[j] * score_grads[j][k] for j in range(len(LENGTHS))) for k in range(len(score_params))]
    # ∇θs P_i = P_i (∇s_i − Σ_j P_j ∇s_j);  hypergradient = −Σ_i c_i ∇θs P_i
    hyper = [-sum(c[i] * P[i] * (score_grads[i][k] - mean_grad[k]) for i in range(len(LENGTHS)))
             for k in range(len(score_params))]
    return hyper, torch.tensor(c, dtype=torch.float64)


@pytest.fixture(scope="module")
def solved():
    proxy, target, score_model, ids, mask, val_ids, val_mask = _setup(seed=3)
    proxy_params = list(proxy.parameters())
    val_loss = bilevel.sequence_losses(bilevel.lm_logits(proxy, val_ids, val_mask), val_ids, val_mask).mean()
    v = [g.detach() for g in torch.autograd.grad(val_loss, proxy_params)]
    weights = bilevel.batch_weights(score_model(ids, mask))  # attached to the score model
    grad_g = _grad_g(proxy, target, weights, ids, mask)
    z = bilevel.solve_z(grad_g, proxy_params, v, steps=3, lr=1e-2, damping=1e-2, clip=0.0, init=0.0)
    hypergrad = bilevel.score_hypergradient(grad_g, list(score_model.parameters()), z)  # the graph route
    return proxy, score_model, ids, mask, v, z, hypergrad


def test_batched_hypergradient_through_graph_equals_per_sample_loop(solved):
    proxy, score_model, ids, mask, _, z, batched = solved
    reference, _ = _per_sample_reference(proxy, score_model, ids, mask, z)
    assert bilevel.norm(reference) > 0
    assert _rel(batched, reference) < 1e-6


@pytest.mark.parametrize("chunk", [0, 4])  # the whole batch in one pass, or chunks of 4 and 2 documents
def test_batched_hypergradient_by_jvp_equals_per_sample_loop(solved, chunk):
    proxy, score_model, ids, mask, _, z, _ = solved
    reference, c_ref = _per_sample_reference(proxy, score_model, ids, mask, z)
    names = [k for k, _ in proxy.named_parameters()]
    _, c = bilevel.per_sample_directional_losses(proxy, ids, mask, dict(zip(names, z, strict=True)), chunk=chunk)
    assert torch.allclose(c, c_ref, rtol=1e-8, atol=1e-14)
    score_params = list(score_model.parameters())
    surrogate = bilevel.surrogate_upper_loss(score_model(ids, mask), c)
    batched = torch.autograd.grad(surrogate, score_params, allow_unused=True)
    batched = [torch.zeros_like(p) if g is None else g for g, p in zip(batched, score_params, strict=True)]
    assert _rel(batched, reference) < 1e-6


def test_z_solve_converges_to_the_damped_linear_solve():
    # On a quadratic g = ½ θᵀAθ the Hessian is A, so z must approach (A + μI)⁻¹ v.
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(1.0, 2.0, 6, dtype=torch.float64)) @ q.T
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    grad_g = torch.autograd.grad(0.5 * theta @ A @ theta, [theta], create_graph=True)
    v = [torch.randn(6, dtype=torch.float64)]
    z = bilevel.solve_z(grad_g, [theta], v, steps=200, lr=0.3, damping=1e-2)
    exact = torch.linalg.solve(A + 1e-2 * torch.eye(6, dtype=torch.float64), v[0])
    assert torch.allclose(z[0], exact, rtol=1e-8, atol=1e-10)
    hz = bilevel.hessian_vector_product(grad_g, [theta], z)
    assert bilevel.z_residual(hz, z, v, 1e-2) < 1e-8


def test_z_solve_clips_each_update():
    theta = torch.ones(4, dtype=torch.float64, requires_grad=True)
    grad_g = torch.autograd.grad(0.5 * (theta ** 2).sum(), [theta], create_graph=True)
    v = [torch.full((4,), 100.0, dtype=torch.float64)]
    z = bilevel.solve_z(grad_g, [theta], v, steps=1, lr=1.0, damping=0.0, clip=1.0)
    assert abs(bilevel.norm(z) - 1.0) < 1e-12  # one step of length lr·clip


def test_weight_entropy_is_log_batch_for_equal_scores():
    weights = bilevel.batch_weights(torch.full((8,), 0.3))
    assert abs(bilevel.weight_entropy(weights) - math.log(8)) < 1e-9


def _fd_hypergradient(proxy, score_model, ids, mask, z, relative):
    proxy_params, score_params = list(proxy.parameters()), list(score_model.parameters())

    def sample_losses():
        with torch.no_grad():  # the fast kernels: no graph, no MATH attention
            return bilevel.sequence_losses(bilevel.lm_logits(proxy, ids, mask), ids, mask)

    c = bilevel.central_difference(sample_losses, proxy_params, z, relative)
    surrogate = bilevel.surrogate_upper_loss(score_model(ids, mask), c)
    grads = torch.autograd.grad(surrogate, score_params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, score_params, strict=True)]


def test_finite_difference_hypergradient_is_the_per_sample_loop_up_to_its_truncation_error(solved):
    proxy, score_model, ids, mask, _, z, _ = solved
    reference, _ = _per_sample_reference(proxy, score_model, ids, mask, z)
    before = [p.detach().clone() for p in proxy.parameters()]
    errors = [_rel(_fd_hypergradient(proxy, score_model, ids, mask, z, step), reference) for step in (2e-4, 1e-4)]
    assert errors[1] < 1e-4
    assert 3.0 < errors[0] / errors[1] < 5.0  # central differences: halving the step quarters the error
    assert all(torch.equal(a, b) for a, b in zip(before, proxy.parameters(), strict=True))  # θp restored exactly


def test_finite_difference_hessian_vector_products_solve_z_like_exact_ones():
    proxy, target, score_model, ids, mask, val_ids, val_mask = _setup(seed=5)
    params = list(proxy.parameters())
    with torch.no_grad():
        weights = bilevel.batch_weights(score_model(ids, mask))
    grad_g = _grad_g(proxy, target, weights, ids, mask)
    val_loss = bilevel.sequence_losses(bilevel.lm_logits(proxy, val_ids, val_mask), val_ids, val_mask).mean()
    v = [g.detach() for g in torch.autograd.grad(val_loss, params)]

    def gradient():
        return [g.detach() for g in _grad_g(proxy, target, weights, ids, mask)]

    exact = bilevel.solve_z_with(lambda x: bilevel.hessian_vector_product(grad_g, params, x), v, steps=4, lr=0.02,
                                 damping=1e-2)
    fd = bilevel.solve_z_with(lambda x: bilevel.central_difference(gradient, params, x, 1e-5), v, steps=4, lr=0.02,
                              damping=1e-2)
    assert _rel(fd.z, exact.z) < 1e-6
    assert exact.residual is not None and abs(fd.residual - exact.residual) < 1e-6
    assert exact.curvature > 0 and abs(fd.curvature - exact.curvature) / exact.curvature < 1e-6


def test_a_carried_z_is_where_the_solve_starts():
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    curvature = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)

    def hvp(x):
        return [curvature @ x[0]]

    v = [torch.tensor([1.0, 1.0], dtype=torch.float64)]
    fresh = bilevel.solve_z_with(hvp, v, steps=1, lr=0.1, damping=0.0)
    assert torch.allclose(fresh.z[0], 0.1 * v[0]) and fresh.residual is None  # from 0: no product taken
    carried = bilevel.solve_z_with(hvp, v, steps=1, lr=0.1, damping=0.0, start=fresh.z)
    expected = fresh.z[0] - 0.1 * (curvature @ fresh.z[0] - v[0])
    assert torch.allclose(carried.z[0], expected) and carried.residual is not None
    assert bilevel.cosine(fresh.z, v) == pytest.approx(1.0)
    del theta
