"""Sparse upcycling: an MoE model initialised from a dense one (Komatsuzaki et al. 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ModelConfig
from longctx.model import layout
from longctx.model.transformer import build_model


def upcycle(dense_model, moe_cfg_model: ModelConfig, *, rngs: nnx.Rngs, noise_std: float = 0.0):
    """An MoE model initialised from a dense one: every non-MoE parameter copied, each
    expert a copy of the layer's dense MLP (``+ noise_std * std(w) * N(0, 1)``,
    independent per expert), router / shared experts / balancing state fresh.

    ``moe_cfg_model`` must match the dense config except for ``moe`` (expert_dim
    = the dense mlp_dim). With ``topk_softmax`` or ``norm_topk_prob`` (weights
    summing to 1), no noise and no dropped tokens, the MoE model computes the
    dense model's function.
    """
    model = build_model(moe_cfg_model, rngs=rngs)
    # Matched layer by layer in the per-layer view, so either model may scan its layers.
    flat = lambda cfg, m: dict(jax.tree_util.tree_flatten_with_path(  # noqa: E731
        layout.to_per_layer(cfg, nnx.to_pure_dict(nnx.state(m, nnx.Param))))[0])
    dense = flat(dense_model.cfg, dense_model)
    target = layout.to_per_layer(moe_cfg_model, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    used = set()

    def one(path, cur):
        src = dense.get(path)
        if src is None:
            return cur  # router, shared experts, load probe: fresh
        used.add(path)
        value, shape = src, cur.shape
        if value.shape == shape:
            return value
        if shape == (moe_cfg_model.moe.num_experts, *value.shape):
            experts = jnp.broadcast_to(value, shape)
            if noise_std > 0:
                noise = jax.random.normal(rngs.params(), shape, value.dtype)
                experts = experts + noise_std * jnp.std(value) * noise
            return experts
        raise ValueError(f"upcycle: {jax.tree_util.keystr(path)} has shape {value.shape} in "
                         f"the dense model and {shape} in the MoE model")

    new = jax.tree_util.tree_map_with_path(one, target)
    missing = sorted(jax.tree_util.keystr(p) for p in dense if p not in used)
    if missing:
        raise ValueError(f"upcycle: dense parameters with no place in the MoE model: {missing}")
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, layout.from_per_layer(moe_cfg_model, new))
    nnx.update(model, params)
    return model
