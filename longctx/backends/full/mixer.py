"""The ``full`` token mixer: exact softmax attention with RoPE, GQA and a KV cache.

State protocol: :mod:`longctx.backends.base`. Built from explicit sizes
(:class:`~longctx.backends.base.MixerDims`) and its section
(:class:`~longctx.backends.full.config.FullConfig`, the keys directly under
``model.attention``).

Without state the whole segment attends to itself with
:func:`longctx.backends.full.ops.attention` (flash / cuDNN / reference by
``model.attention.impl``). With state, the state is a KV cache of
``model.max_seq_len`` slots: the segment's keys and values are written at slot
``position % max_seq_len`` and the queries attend to every cached key whose
stored position is visible (causal, window, same segment id). A segment of one
token is one decode step. Cached attention materialises ``[S, max_seq_len]``
scores, which is right for decoding (one query, memory bound); training at long
length uses the stateless path.

``model.attention.conv_size = W > 0`` adds a short causal depthwise convolution
on q, k and v before RoPE, so a key also carries the tokens just before it
("smeared keys", Olsson et al. 2022, "In-context learning and induction heads";
canon layers, Allen-Zhu 2025). Associative recall then needs one attention hop
instead of a previous-token head feeding an induction head: the tiny model
learns MQAR in a few hundred steps instead of stalling on the induction
plateau. The kernel starts as the identity (current tap 1, earlier taps 0),
i.e. as plain attention. Its state is the last ``W - 1`` projected q/k/v and
their segment ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.backends.base import Mixer, MixerDims, causal_pairs
from longctx.backends.full import ops as full_attention
from longctx.backends.full.config import FullConfig
from longctx.layers import DTYPES, RMSNorm, causal_conv, param
from longctx.parallel import context
from longctx.rope import rope


class FullAttention(Mixer):
    def __init__(self, dims: MixerDims, cfg: FullConfig, *, rngs: nnx.Rngs,
                 zigzag: bool = False):
        # Context parallelism: with `zigzag` the stateless input arrives in zigzag token
        # order whenever the mesh splits the sequence (the model permutes once per forward).
        self.token_layout = "zigzag" if zigzag else "natural"
        self.n_heads, self.n_kv_heads = dims.n_heads, dims.n_kv_heads
        self.head_dim = D = dims.head_dim
        self.dtype = DTYPES[dims.dtype]
        self.attn = cfg  # frozen dataclass: static
        self.rope_theta, self.rope_scaling = dims.rope_theta, dims.rope_scaling
        self.rope_layout = dims.rope_layout
        self.cache_len = dims.max_seq_len
        E, H, K = dims.d_model, dims.n_heads, dims.n_kv_heads
        std, out_std = dims.init_std, dims.out_std
        self.wq = param(rngs, (E, H, D), ("embed", "heads", "head_dim"), std=std)
        self.wk = param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), std=std)
        self.wv = param(rngs, (E, K, D), ("embed", "kv_heads", "head_dim"), std=std)
        self.wo = param(rngs, (H, D, E), ("heads", "head_dim", "embed"), std=out_std)
        self.conv_size = W = cfg.conv_size

        def conv(heads):
            if not W:
                return nnx.data(None)
            return param(rngs, (W, heads, D), (None, "heads" if heads == H else "kv_heads",
                                               "head_dim"),
                         value=jnp.zeros((W, heads, D), jnp.float32).at[-1].set(1.0))

        self.conv_q, self.conv_k, self.conv_v = conv(H), conv(K), conv(K)

        # Pretrained architectures: projection biases (zeros; flat [heads * head_dim] so that the
        # optimizer's ndim rule keeps weight decay off them, split over heads like q, k, v) and
        # q/k RMSNorm over head_dim (Qwen3). Constants: the rng stream is unchanged.
        def bias(n, axis):
            return param(rngs, (n,), (axis,), value=jnp.zeros((n,), jnp.float32))

        none = nnx.data(None)
        self.bq, self.bk, self.bv = ((bias(H * D, "heads"), bias(K * D, "kv_heads"),
                                      bias(K * D, "kv_heads")) if cfg.qkv_bias else (none,) * 3)
        self.bo = bias(E, "embed") if cfg.out_bias else none
        norm = (lambda: RMSNorm(D, eps=dims.norm_eps, axis="head_dim", rngs=rngs))
        self.q_norm, self.k_norm = (norm(), norm()) if cfg.qk_norm else (none, none)

    @classmethod
    def from_config(cls, dims: MixerDims, attention, *, rngs: nnx.Rngs) -> "FullAttention":
        # Zigzag only if every layer of the stack is `full` without a short conv (a conv or
        # a recurrence must see natural order): see model.attention.cp_load_balance.
        zigzag = (attention.cp_load_balance and not attention.conv_size
                  and set(attention.layer_backends(len(attention.pattern) or 1)) == {"full"})
        return cls(dims, attention.section("full"), rngs=rngs, zigzag=zigzag)

    def mixing_flops(self, batch: int, seq_len: int, segment_len: int = 0) -> float:
        """``QK^T`` and ``PV`` over the visible (causal, windowed) pairs: ``4 H D`` each.

        Useful work, as MFU conventions count it (PaLM, MaxText): masked-out blocks
        and the KV cache's empty slots are not counted. Segments change nothing.
        """
        del segment_len
        pairs = causal_pairs(seq_len, window=self.attn.window)
        return 4.0 * batch * pairs * self.n_heads * self.head_dim

    def init_state(self, batch_size: int, dtype=jnp.float32):
        """KV cache: k/v ``[B, L, Hkv, D]``, their positions (-1 = empty) and segment ids."""
        shape = (batch_size, self.cache_len, self.n_kv_heads, self.head_dim)
        state = {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch_size, self.cache_len), -1, jnp.int32),
            "seg": jnp.zeros((batch_size, self.cache_len), jnp.int32),
        }
        if self.conv_size:
            W, D = self.conv_size, self.head_dim
            state["conv"] = {
                "q": jnp.zeros((batch_size, W - 1, self.n_heads, D), dtype),
                "k": jnp.zeros((batch_size, W - 1, self.n_kv_heads, D), dtype),
                "v": jnp.zeros((batch_size, W - 1, self.n_kv_heads, D), dtype),
                "seg": jnp.full((batch_size, W - 1), -1, jnp.int32),  # -1: before the start
            }
        return state

    def _project(self, x):
        """``x [B, S, E]`` -> ``q [B, S, H, D]``, ``k, v [B, S, K, D]`` (projections, their
        biases and q/k norm where configured; no position)."""
        dt = self.dtype
        x = x.astype(dt)
        q = jnp.einsum("bse,ehd->bshd", x, self.wq[...].astype(dt))
        k = jnp.einsum("bse,ehd->bshd", x, self.wk[...].astype(dt))
        v = jnp.einsum("bse,ehd->bshd", x, self.wv[...].astype(dt))
        if self.bq is not None:
            q, k, v = (t + b[...].astype(dt).reshape(t.shape[2:])
                       for t, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _qkv(self, x, positions, state, segment_ids):
        """Projections (+ short conv) -> ``(q, k, v, q0, k0, conv_state)``; q, k with RoPE,
        q0, k0 the same before RoPE (content keys for memories that ignore position)."""
        q, k, v = self._project(x)
        conv_state = None
        if self.conv_size:
            q, k, v, conv_state = self._conv(q, k, v, state, segment_ids)
        q0, k0 = q, k
        q = rope(q, positions, theta=self.rope_theta, scaling=self.rope_scaling,
                 layout=self.rope_layout)
        k = rope(k, positions, theta=self.rope_theta, scaling=self.rope_scaling,
                 layout=self.rope_layout)
        return q, k, v, q0, k0, conv_state

    def __call__(self, x, *, positions, state=None, segment_ids=None):
        q, k, v, _, _, conv_state = self._qkv(x, positions, state, segment_ids)
        a = self.attn
        strategy = context.active_strategy(a.context_parallel)
        if state is None and strategy is not None:  # the sequence is split over `sequence`
            zigzag = self.token_layout == "zigzag"
            o = context.attention(q, k, v, causal=True, window=a.window,
                                  segment_ids=segment_ids, strategy=strategy,
                                  load_balance=zigzag, inputs_permuted=zigzag,
                                  block_q=a.block_q, block_k=a.block_k)
            new_state = None
        elif state is None:
            context.note_gspmd("full attention", "model.attention.context_parallel=none")
            o = full_attention.attention(q, k, v, causal=True, window=a.window,
                                         segment_ids=segment_ids, impl=a.impl,
                                         block_q=a.block_q, block_k=a.block_k)
            new_state = None
        else:
            context.note_gspmd("full attention", "it attends from a KV cache (decoding, or "
                               "segments of model.segment_len)")
            o, new_state = self._cached(q, k, v, positions, state, segment_ids)
            if conv_state is not None:
                new_state["conv"] = conv_state
        return self._out(o), new_state

    def _out(self, o):
        """Output projection ``o [B, S, H, D] -> [B, S, E]`` (+ its bias where configured)."""
        dt = self.dtype
        y = jnp.einsum("bshd,hde->bse", o, self.wo[...].astype(dt))
        return y if self.bo is None else y + self.bo[...].astype(dt)

    def _conv(self, q, k, v, state, segment_ids):
        B, S = q.shape[:2]
        tails = (state or self.init_state(B, q.dtype))["conv"]
        ids = jnp.zeros((B, S), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        seg = jnp.concatenate([tails["seg"], ids], axis=1)  # [B, W-1+S]
        mask = None if segment_ids is None else seg  # taps never cross a document boundary
        q, tq = causal_conv(q, self.conv_q[...], tails["q"], mask)
        k, tk = causal_conv(k, self.conv_k[...], tails["k"], mask)
        v, tv = causal_conv(v, self.conv_v[...], tails["v"], mask)
        return q, k, v, {"q": tq, "k": tk, "v": tv, "seg": seg[:, S:]}

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
