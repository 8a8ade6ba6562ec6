"""One BLISS outer step (``../shared/BLISS.md``): K inner steps, v, the z-solve, the hypergradient,
the upper step, over the pure functions of ``engine.bliss.bilevel``.

It is the code the training loop runs (``engine.bliss.train``) and the code the outer-step benchmark
times, phase by phase, with a ``PhaseTimer``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from engine.bliss import bilevel
from engine.bliss.config import TrainScorerConfig
from engine.bliss.score_model import ScoreModel
from engine.pretrain.schedule import lr_multiplier, warmup_steps
from engine.runtime import adamw_param_groups, autocast


def no_reduced_precision(device: torch.device):
    """fp32 (TF32 matmuls where enabled) inside a bf16 autocast: finite differences never in bf16."""
    return torch.autocast(device_type=device.type, enabled=False)


def cosine_lr(step: int, total: int, peak: float, warmup_fraction: float, min_ratio: float) -> float:
    """The pretraining schedule (``engine.pretrain.schedule``) as an absolute rate: warm-up, then cosine to min_ratio·peak."""
    return peak * lr_multiplier(step, total_steps=total, warmup=warmup_steps(total, warmup_fraction), min_ratio=min_ratio)


def make_adamw(model: torch.nn.Module, config: TrainScorerConfig, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (``engine.runtime.adamw_param_groups``)."""
    return torch.optim.AdamW(adamw_param_groups(model, config.weight_decay), lr=lr, betas=(config.beta1, config.beta2))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    if max_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def target_logits_of(target, ids, mask, gamma: float) -> torch.Tensor | None:
    """The frozen target's logits (B, T, V) for the KL term, None without one (γ = 0)."""
    if target is None or not gamma:
        return None
    with torch.no_grad():
        return bilevel.lm_logits(target, ids, mask)


def lower_objective_terms(proxy, target, ids, mask, weights, config: TrainScorerConfig, gamma: float,
                          target_logits: torch.Tensor | None = None):
    """g = Σ P_i L_i + γ·KL + λ‖θp‖² for one batch, and the per-sample losses L_i (B,). ``target_logits``:
    the target's logits of this batch when already computed (they do not depend on θp)."""
    logits = bilevel.lm_logits(proxy, ids, mask)
    losses = bilevel.sequence_losses(logits, ids, mask)  # (B,)
    if target_logits is None:
        target_logits = target_logits_of(target, ids, mask, gamma)
    kl = None if target_logits is None else bilevel.token_kl(logits, target_logits, mask)
    g = bilevel.lower_objective(losses, weights, list(proxy.parameters()), gamma=gamma, l2=config.l2, kl=kl)
    return g, losses


@dataclass(frozen=True)
class OuterStepFigures:
    """What one outer step reports (the ``step`` event)."""

    loss_lower: float
    loss_upper: float
    hypergrad_norm: float
    z_residual: float | None
    """‖(H + μI)z − v‖/‖v‖ of the last iterate the z-solve multiplied by H (None: it took no product)."""
    z_cos_v: float
    """cos(z, v): 1.0 means the z-solve only rescaled the validation gradient (BLISS.md)."""
    z_curvature: float | None
    """‖Hz‖/‖z‖ of that iterate: how much curvature the solve saw along z."""
    weight_entropy: float
    lr_scorer: float
    lr_proxy: float
    z: list[torch.Tensor] = field(repr=False, default_factory=list)
    """The solved z (the next outer step starts from it with ``--z-carry``)."""


class PhaseTimer:
    """Wall time per named phase, summed over calls (the outer-step benchmark reads it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def outer_step(*, proxy: torch.nn.Module, score_model: ScoreModel, target: torch.nn.Module | None,
               opt_proxy: torch.optim.Optimizer, opt_scorer: torch.optim.Optimizer,
               train_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               val_batch: tuple[torch.Tensor, torch.Tensor], config: TrainScorerConfig, gamma: float, step: int,
               lr_proxy: float, timer: PhaseTimer | None = None,
               z_start: list[torch.Tensor] | None = None) -> OuterStepFigures:
    """One BLISS outer step (BLISS.md): K inner steps, v, z-solve, hypergradient, upper step.

    ``train_batches`` yields K + 1 (ids, mask) batches: K for the inner steps, one for the z-solve and
    the hypergradient. ``step`` is the number of outer steps done before this one (for the schedules).
    ``z_start``: the z the solve starts from (the previous step's, with ``--z-carry``), else ``z_init``.
    The route (``config.hypergrad``: graph, jvp or fd) and the z-solve's products (``config.z_hvp``:
    exact or fd) are chosen independently; ``fd`` with ``fd`` builds no higher-order graph at all.
    """
    device = next(proxy.parameters()).device
    timed = timer or (lambda name: contextlib.nullcontext())
    proxy_params = list(proxy.parameters())
    score_params = list(score_model.parameters())

    # 1. K inner steps on g with the current (detached) weights; bf16 autocast on CUDA.
    lower = 0.0
    with timed("inner"):
        for k in range(config.inner_steps):
            set_lr(opt_proxy, cosine_lr(step * config.inner_steps + k, config.steps * config.inner_steps, lr_proxy,
                                        config.lr_warmup_fraction, config.min_lr_ratio))
            ids, mask = next(train_batches)
            with autocast(device):
                with torch.no_grad():
                    weights = bilevel.batch_weights(score_model(ids, mask).float(), config.score_scale)  # (B,)
                g, _ = lower_objective_terms(proxy, target, ids, mask, weights, config, gamma)
            g.backward()
            clip_and_step(proxy, opt_proxy, config.grad_clip)
            lower += g.item() / config.inner_steps

    # 2. Validation gradient v = ∇θp F.
    with timed("validation_gradient"):
        ids, mask = val_batch
        with autocast(device):
            loss_upper = bilevel.sequence_losses(bilevel.lm_logits(proxy, ids, mask), ids, mask).mean()
        v = [t.float() for t in torch.autograd.grad(loss_upper, proxy_params)]

    # 3-4. z-solve and hypergradient on a fresh batch, weights attached to the score model.
    ids, mask = next(train_batches)
    with timed("score_forward"):
        scores = score_model(ids, mask)  # (B,)
        weights = bilevel.batch_weights(scores, config.score_scale)
    needs_graph = config.hypergrad in ("graph", "jvp") or config.z_hvp == "exact"
    grad_g = None
    target_logits = target_logits_of(target, ids, mask, gamma)  # once: every gradient of g below reuses them
    with bilevel.differentiable_attention() if needs_graph else contextlib.nullcontext():
        if needs_graph:  # fp32 and the MATH attention kernel: double backward / forward-mode AD
            with timed("lower_gradient_graph"):
                attached = weights if config.hypergrad == "graph" else weights.detach()
                g, _ = lower_objective_terms(proxy, target, ids, mask, attached, config, gamma, target_logits)
                grad_g = torch.autograd.grad(g, proxy_params, create_graph=True)
        if config.z_hvp == "exact":
            def hvp(x):
                return bilevel.hessian_vector_product(grad_g, proxy_params, x)
        else:  # differences of two gradients of g (weights fixed), fast kernels, fp32
            def lower_gradient():
                with no_reduced_precision(device):
                    g, _ = lower_objective_terms(proxy, target, ids, mask, weights.detach(), config, gamma,
                                                 target_logits)
                    return list(torch.autograd.grad(g, proxy_params))

            def hvp(x):
                return [h.float() for h in bilevel.central_difference(lower_gradient, proxy_params, x, config.fd_step)]
        with timed("z_solve"):
            solve = bilevel.solve_z_with(hvp, v, steps=config.z_steps, lr=config.z_lr, damping=config.z_damping,
                                         clip=config.z_clip, init=config.z_init, start=z_start)
        z = solve.z
        with timed("hypergradient"):
            if config.hypergrad == "graph":
                hypergrad = bilevel.score_hypergradient(grad_g, score_params, z)
            else:
                del grad_g  # the graph of ∇θp g is not needed any more: free it before the next passes
                if config.hypergrad == "jvp":
                    names = [name for name, _ in proxy.named_parameters()]
                    _, c = bilevel.per_sample_directional_losses(proxy, ids, mask, dict(zip(names, z, strict=True)),
                                                                 chunk=config.hypergrad_chunk)
                else:  # fd: c_i from L_i at θp ± εz, two forward passes with the fast kernels
                    def sample_losses():
                        with torch.no_grad(), no_reduced_precision(device):
                            return bilevel.sequence_losses(bilevel.lm_logits(proxy, ids, mask), ids, mask)

                    c = bilevel.central_difference(sample_losses, proxy_params, z, config.fd_step).float()
                hypergrad = torch.autograd.grad(bilevel.surrogate_upper_loss(scores, c, config.score_scale), score_params,
                                                allow_unused=True)
                hypergrad = [torch.zeros_like(p) if h is None else h
                             for h, p in zip(hypergrad, score_params, strict=True)]
    hypergrad_norm = bilevel.norm(hypergrad)

    # 5. Upper AdamW step on the score model.
    with timed("upper_step"):
        lr_s = cosine_lr(step, config.steps, config.lr_scorer, config.lr_warmup_fraction, config.min_lr_ratio)
        set_lr(opt_scorer, lr_s)
        for p, h in zip(score_params, hypergrad, strict=True):
            p.grad = h.detach().to(p.dtype)
        clip_and_step(score_model, opt_scorer, config.grad_clip)
    return OuterStepFigures(loss_lower=lower, loss_upper=loss_upper.item(), hypergrad_norm=hypergrad_norm,
                            z_residual=solve.residual, z_cos_v=bilevel.cosine(z, v), z_curvature=solve.curvature,
                            weight_entropy=bilevel.weight_entropy(weights), lr_scorer=lr_s,
                            lr_proxy=opt_proxy.param_groups[0]["lr"], z=[zi.detach() for zi in z])
