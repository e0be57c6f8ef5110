"""The Mixture-of-Experts feed-forward layer (Flax NNX).

    moe = MoE(d_model, cfg.moe, mlp_dim=cfg.mlp_dim, rngs=rngs)
    y, aux = moe(x)        # x [B, S, D] -> y [B, S, D], aux: dict of scalars

The math (routing, dispatch forms, losses) is in :mod:`longctx.moe.ops`; this
module holds the parameters, picks the dispatch form from the section, reports
the aux losses and statistics, and keeps the selection bias of
auxiliary-loss-free balancing, moved after each optimizer step by its
``post_update`` hook (the trainer calls every module's hook generically).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.layers import SwiGLU, param
from longctx.moe.config import MoEConfig
from longctx.moe.ops import (capacity_moe, expert_capacity, expert_choice_moe, expert_counts,
                             expert_parallel_active, expert_parallel_moe, load_balance_loss,
                             local_dropless_moe, route, router_z_loss)


# ----------------------------------------------------------------------------
# The Flax module
# ----------------------------------------------------------------------------


class RouterBias(nnx.Variable):
    """Selection-only expert bias of auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2).

    Not an ``nnx.Param``: the optimizer (``wrt=nnx.Param``) neither trains nor
    weight-decays it; :meth:`MoE.post_update` moves it after each step.
    """


class LoadProbe(nnx.Param):
    """Carries the global expert load from the forward pass to the update step.

    It enters the loss as ``c * (x - stop_gradient(x))`` with ``x = probe .
    stop_gradient(load)``: the value is exactly 0, and the gradient wrt the probe
    is ``c * load``, summed over devices, segments and microbatches exactly like
    every other gradient, so it survives remat, the segment scan and gradient
    accumulation (a mutable variable written in the forward would be lost inside
    ``jax.checkpoint`` / ``lax.scan``). ``c = 2**-64`` keeps it out of the
    global gradient norm; the optimizer's update of the probe itself is
    irrelevant (the term is 0 for any probe value).
    """


LOAD_PROBE_SCALE = 2.0 ** -64


class MoE(nnx.Module):
    """Routed experts (+ optional shared experts) replacing a dense SwiGLU.

    ``__call__(x [B, S, D]) -> (y [B, S, D], aux)``, aux keys: ``moe_lb_loss``,
    ``moe_z_loss`` (already weighted, added to the loss), ``moe_dropped_frac``,
    ``moe_load_min / max / mean`` (fraction of routed token-slots per expert; the
    mean is 1/E).
    """

    def __init__(self, d_model: int, cfg: MoEConfig, *, mlp_dim: int, dtype=jnp.float32,
                 std: float = 0.02, out_std: float | None = None, rngs: nnx.Rngs):
        self.cfg = cfg  # frozen dataclass: static
        self.dtype = dtype
        E, F = cfg.num_experts, cfg.expert_dim or mlp_dim
        self.router = param(rngs, (d_model, E), ("embed", None), std=std)
        self.w_gate = param(rngs, (E, d_model, F), ("expert", "embed", "mlp"), std=std)
        self.w_up = param(rngs, (E, d_model, F), ("expert", "embed", "mlp"), std=std)
        self.w_down = param(rngs, (E, F, d_model), ("expert", "mlp", "embed"), std=out_std or std)
        self.shared = nnx.data(SwiGLU(d_model, cfg.shared_experts * F, dtype=dtype, std=std,
                                      out_std=out_std, rngs=rngs)
                               if cfg.shared_experts else None)
        balancing = cfg.routed_bias_update_rate > 0
        self.bias = nnx.data(RouterBias(jnp.zeros((E,), jnp.float32)) if balancing else None)
        self.load_probe = nnx.data(
            LoadProbe(jnp.zeros((E,), jnp.float32), out_sharding=(None,), eager_sharding=False)
            if balancing else None)
        # Jitter (Switch Transformer): only in training mode (`model.train()`), only if > 0.
        self.deterministic = True
        self.rngs = nnx.data(nnx.Rngs(jitter=rngs.params()) if cfg.jitter_noise > 0 else None)

    def __call__(self, x):
        cfg = self.cfg
        B, S, D = x.shape
        E, k = cfg.num_experts, cfg.num_experts_per_tok
        x = x.astype(self.dtype)
        xr = x.astype(jnp.float32)
        if cfg.jitter_noise > 0 and not self.deterministic:
            eps = cfg.jitter_noise
            xr = xr * jax.random.uniform(self.rngs.jitter(), xr.shape, jnp.float32,
                                         1.0 - eps, 1.0 + eps)
        logits = jnp.einsum("bsd,de->bse", xr, self.router[...])  # [B, S, E] float32
        bias = None if self.bias is None else jax.lax.stop_gradient(self.bias[...])
        r = route(logits, k=k, router=cfg.router, bias=bias, norm_topk_prob=cfg.norm_topk_prob,
                  routed_scaling_factor=cfg.routed_scaling_factor, n_groups=cfg.n_groups,
                  topk_groups=cfg.topk_groups)
        w = (self.w_gate[...], self.w_up[...], self.w_down[...])

        if cfg.expert_choice:
            C = expert_capacity(S, k, E, cfg.capacity_factor)
            y, chosen = expert_choice_moe(x, r.probs, *w, capacity=C)
            dropped = jnp.mean((~chosen).astype(jnp.float32))
            counts = jnp.full((E,), B * C, jnp.float32)
        else:
            dispatch = cfg.resolved_dispatch
            cf = cfg.capacity_factor if dispatch == "capacity" else 0.0
            if expert_parallel_active(cfg):
                y, dropped = expert_parallel_moe(x, r.experts, r.weights, *w, capacity_factor=cf)
            elif dispatch == "capacity":
                C = expert_capacity(S, k, E, cf)
                y, keep = capacity_moe(x, r.experts, r.weights, *w, capacity=C)
                dropped = jnp.mean((~keep).astype(jnp.float32))
            else:
                y = local_dropless_moe(x, r.experts, r.weights, *w, impl=cfg.dropless_impl)
                dropped = jnp.zeros((), jnp.float32)
            counts = expert_counts(r.experts, E)
        if self.shared is not None:
            y = y + self.shared(x)

        load = counts / jnp.sum(counts)  # fraction of routed token-slots per expert
        lb = 0.0 if cfg.expert_choice else load_balance_loss(r.probs, r.experts)
        lb_loss = cfg.load_balance_loss_weight * lb
        if self.load_probe is not None:
            probe = jnp.sum(self.load_probe[...] * jax.lax.stop_gradient(load))
            lb_loss = lb_loss + LOAD_PROBE_SCALE * (probe - jax.lax.stop_gradient(probe))
        aux = {"moe_lb_loss": jnp.asarray(lb_loss, jnp.float32),
               "moe_z_loss": cfg.router_z_loss_weight * router_z_loss(logits),
               "moe_dropped_frac": jnp.asarray(dropped, jnp.float32),
               "moe_load_min": jnp.min(load), "moe_load_max": jnp.max(load),
               "moe_load_mean": jnp.mean(load)}
        return y.astype(x.dtype), aux

    # -- after each optimizer step (called by longctx.model.transformer.post_update) ------

    def post_update(self, grads) -> None:
        """Auxiliary-loss-free balancing: ``bias += rate * sign(mean(load) - load)``
        (DeepSeek-V3 sec. 2.1.2: underloaded experts gain, overloaded ones lose).

        ``grads``: this layer's gradient state (``nnx.Param``s) of the step; the global
        load is read from the :class:`LoadProbe` gradient (a positive multiple of the
        load, which the sign does not see). No-op without balancing.
        """
        if self.bias is None:
            return
        load = grads["load_probe"][...]
        # per layer (a scanned stack's load is [n_groups, E]): the mean over its experts
        step = self.cfg.routed_bias_update_rate * jnp.sign(
            jnp.mean(load, axis=-1, keepdims=True) - load)
        self.bias[...] = self.bias[...] + step
