"""Building blocks: parameters with logical axes, RMSNorm, SwiGLU, embedding, short conv.

RoPE is :mod:`longctx.rope`.

Every parameter is float32 and carries logical axis names in its ``out_sharding``
metadata (``batch, length, embed, heads, kv_heads, head_dim, mlp, vocab,
expert``); the trainer maps them onto mesh axes with the config's rules table.
Layers cast parameters to the compute dtype at use (``dtype``), and keep norms,
softmax and logits in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(rngs: nnx.Rngs, shape, axes, *, std=None, value=None) -> nnx.Param:
    """A float32 ``nnx.Param`` with logical axis names (normal(0, std) or a value).

    ``eager_sharding=False``: logical names are not mesh axes, so the variable is
    created unsharded and placed later by the trainer (flax FLIP 4844).
    """
    assert len(shape) == len(axes), (shape, axes)
    if value is None:
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


@jax.custom_vjp
def grads_together(*xs):
    """The identity on ``xs``; in the backward pass their cotangents leave together.

    The cotangents pass one ``optimization_barrier``, so none of them is usable before
    all are computed. Tie a layer's input to its weights (``x, w = grads_together(x,
    w)``) and the input's cotangent, which the layers before it wait for, comes only
    after the weights' gradients. Without it XLA may schedule a weight gradient after
    the backward of the layers before, keeping the activations it reads alive through
    them (a block's feed-forward inputs through the whole mixer's backward).
    """
    return xs


def _grads_together_fwd(*xs):
    return xs, None


def _grads_together_bwd(_, cts):
    return tuple(jax.lax.optimization_barrier(tuple(cts)))


grads_together.defvjp(_grads_together_fwd, _grads_together_bwd)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis: str = "embed", rngs: nnx.Rngs):
        self.eps = eps  # `axis`: logical name of the normalised dimension (q/k norm: head_dim)
        self.scale = param(rngs, (dim,), (axis,), value=jnp.ones((dim,), jnp.float32))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(x W_gate) * (x W_up)) (Shazeer 2020, "GLU Variants")."""

    def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, std=0.02,
                 out_std=None, rngs: nnx.Rngs):
        self.dtype = dtype
        self.w_gate = param(rngs, (d_model, hidden), ("embed", "mlp"), std=std)
        self.w_up = param(rngs, (d_model, hidden), ("embed", "mlp"), std=std)
        self.w_down = param(rngs, (hidden, d_model), ("mlp", "embed"), std=out_std or std)

    def __call__(self, x):  # [B, S, E] -> [B, S, E]
        dt = self.dtype
        # the input's cotangent waits for the weights' gradients (see grads_together)
        x, w_gate, w_up, w_down = grads_together(
            x.astype(dt), *(w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down)))
        gate = jnp.einsum("bse,em->bsm", x, w_gate)
        up = jnp.einsum("bse,em->bsm", x, w_up)
        return jnp.einsum("bsm,me->bse", jax.nn.silu(gate) * up, w_down)


class Embed(nnx.Module):
    """Token embedding ``[vocab, embed]``; ``attend`` is the tied LM head."""

    def __init__(self, vocab_size: int, d_model: int, *, std=0.02, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab_size, d_model), ("vocab", "embed"), std=std)

    def __call__(self, tokens, dtype):  # [B, S] int -> [B, S, E]
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

    def attend(self, x):  # [B, S, E] -> [B, S, V] float32
        return jnp.einsum("bse,ve->bsv", x, self.embedding[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)


def causal_conv(x, w, tail, seg=None):
    """Short causal depthwise convolution over time: ``y_t = sum_i w_i x_{t-W+1+i}``.

    ``x [B, S, H, D]``, ``w [W, H, D]``, ``tail [B, W-1, H, D]``: the inputs just
    before ``x`` (zeros at the start of a sequence), so that segments and decode
    steps continue exactly. ``seg [B, W-1+S]``: document ids of the tail and of
    ``x``; a tap from another document than position ``t``'s is dropped.
    Returns ``(y [B, S, H, D], new_tail [B, W-1, H, D])``.
    """
    W, S = w.shape[0], x.shape[1]
    xe = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, W-1+S, H, D]
    y = 0
    for i in range(W):
        tap = xe[:, i:i + S] * w[i].astype(x.dtype)
        if seg is not None:
            tap = jnp.where((seg[:, i:i + S] == seg[:, W - 1:])[:, :, None, None], tap, 0)
        y = y + tap
    return y, xe[:, S:].astype(tail.dtype)
