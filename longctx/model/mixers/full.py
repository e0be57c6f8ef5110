"""The ``full`` token mixer: exact softmax attention with RoPE, GQA and a KV cache.

State protocol (shared by every mixer)::

    init_state(batch_size, dtype) -> State
    __call__(x, *, positions, state=None, segment_ids=None) -> (y, new_state)

Without state the whole segment attends to itself with
:func:`longctx.attention.full.attention` (flash / cuDNN / reference by
``model.attention.impl``). With state, the state is a KV cache of
``model.max_seq_len`` slots: the segment's keys and values are written at slot
``position % max_seq_len`` and the queries attend to every cached key whose
stored position is visible (causal, window, same segment id). A segment of one
token is one decode step. Cached attention materialises ``[S, max_seq_len]``
scores, which is right for decoding (one query, memory bound); training at long
length uses the stateless path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.attention import full as full_attention
from longctx.config import ModelConfig
from longctx.model.layers import DTYPES, param, rope


class FullAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = D = cfg.resolved_head_dim
        self.dtype = DTYPES[cfg.dtype]
        self.attn = cfg.attention
        self.rope_theta, self.rope_scaling = cfg.rope_theta, cfg.rope_scaling
        self.cache_len = cfg.max_seq_len
        E, H, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.wq = param(rngs, (E, H, D), ("embed", "heads", "head_dim"), std=std)
        self.wk = param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), std=std)
        self.wv = param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), std=std)
        self.wo = param(rngs, (H, D, E), ("heads", "head_dim", "embed"), std=out_std)

    def init_state(self, batch_size: int, dtype=jnp.float32):
        """KV cache: k/v ``[B, L, Hkv, D]``, their positions (-1 = empty) and segment ids."""
        shape = (batch_size, self.cache_len, self.n_kv_heads, self.head_dim)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch_size, self.cache_len), -1, jnp.int32),
            "seg": jnp.zeros((batch_size, self.cache_len), jnp.int32),
        }

    def __call__(self, x, *, positions, state=None, segment_ids=None):
        dt = self.dtype
        x = x.astype(dt)
        q = jnp.einsum("bse,ehd->bshd", x, self.wq[...].astype(dt))  # [B, S, H, D]
        k = jnp.einsum("bse,ehd->bshd", x, self.wk[...].astype(dt))  # [B, S, K, D]
        v = jnp.einsum("bse,ehd->bshd", x, self.wv[...].astype(dt))
        q = rope(q, positions, theta=self.rope_theta, scaling=self.rope_scaling)
        k = rope(k, positions, theta=self.rope_theta, scaling=self.rope_scaling)
        a = self.attn
        if state is None:
            o = full_attention.attention(q, k, v, causal=True, window=a.window,
                                         segment_ids=segment_ids, impl=a.impl,
                                         block_q=a.block_q, block_k=a.block_k)
            new_state = None
        else:
            o, new_state = self._cached(q, k, v, positions, state, segment_ids)
        y = jnp.einsum("bshd,hde->bse", o, self.wo[...].astype(dt))
        return y, new_state

    def _cached(self, q, k, v, positions, state, segment_ids):
        B, S = positions.shape
        if segment_ids is None:
            segment_ids = jnp.zeros((B, S), jnp.int32)
        slots = positions % self.cache_len  # [B, S]

        def write(buf, slot, new):  # per batch row: buf [L, ...], slot [S], new [S, ...]
            return buf.at[slot].set(new.astype(buf.dtype))

        new_state = {
            "k": jax.vmap(write)(state["k"], slots, k),
            "v": jax.vmap(write)(state["v"], slots, v),
            "pos": jax.vmap(write)(state["pos"], slots, positions.astype(jnp.int32)),
            "seg": jax.vmap(write)(state["seg"], slots, segment_ids.astype(jnp.int32)),
        }
        k_pos = new_state["pos"][:, None, None, None, :]  # [B, 1, 1, 1, L]
        mask = full_attention.visible(
            positions[:, None, None, :, None], k_pos, causal=True, window=self.attn.window,
            q_seg=segment_ids[:, None, None, :, None],
            k_seg=new_state["seg"][:, None, None, None, :]) & (k_pos >= 0)
        o = full_attention.masked_attention(q, new_state["k"].astype(q.dtype),
                                            new_state["v"].astype(q.dtype), mask)
        return o, new_state
