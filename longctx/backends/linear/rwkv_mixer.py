"""RWKV-6 ("Finch") and RWKV-7 ("Goose") time mixing: variants ``rwkv6`` / ``rwkv7``
of the ``linear`` backend (built by ``LinearAttention.from_config``).

The math is :func:`longctx.ops.rwkv6` / ``rwkv7``; sizes from
``MixerDims`` and ``model.attention.linear`` (``key_dim``, ``value_dim``,
``chunk_size``, ``rwkv_low_rank``; ``conv_size`` and ``feature_map`` are not used:
RWKV's token shift takes the short conv's place)::

    x [B, S, E], x_prev = x shifted by one token (the last token of the previous
    segment from the state), d = x_prev - x
    rwkv6 (Peng et al. 2024, "Eagle and Finch", eq. 13-19):
        ddlerp: m = tanh((x + d mu_x) W1) W2  (5 LoRAs, rank rwkv_low_rank)
                x_c = x + d (mu_c + m_c)        c in (w, k, v, r, g)
        r, k [B, S, H, K], v [B, S, H, V] projections; g = silu(x_g W_g)
        w = -exp(w0 + tanh(x_w A) B)            (data-dependent log decay, LoRA)
        o = rwkv6(r, k, v, w, u, scale=1)       (bonus u [H, K])
        y = (GroupNorm_per_head(o) * g) W_o
    rwkv7 (Peng et al. 2025, "RWKV-7 Goose", sec. 4):
        x_c = x + d mu_c                        c in (r, w, k, v, a, g)
        w = -e^{-1/2} sigmoid(w0 + tanh(x_w A) B)   (log decay in (-0.61, 0))
        a_gate = sigmoid(a0 + x_a A_a B_a)      (in-context learning rate, [H, K])
        kappa = l2norm_per_head(k * k_k);  k <- k * (1 + (a_gate - 1) k_a)
        o = rwkv7(r, w, k, v, a=-kappa, b=kappa * a_gate, scale=1)
        o = GroupNorm_per_head(o) + (sum_K r * k * r_k) v   (bonus)
        y = (o * (sigmoid(x_g G1) G2)) W_o

RWKV-7's cross-layer *value residual* (v of every layer mixed with the first
layer's v) is left out: under the one-mixer protocol a layer sees only its own
input ``x`` and state, and the first layer's values would have to travel as an
extra carry through the model driver (a change of ``longctx.model`` for one
variant). Without it RWKV-7 is the paper's ablation "no v-first".

State: ``{"S": [B, H, K, V] float32, "shift": [B, E]}`` (the last input token).
``state=None``: the chunk form over the segment; with a state the chunk form for
``S > 1`` tokens and the recurrent form for ``S == 1`` (decoding). Packed
documents (``segment_ids``) are refused with an error (not implemented). With the
mesh splitting ``sequence`` (``model.attention.context_parallel``) the stateless call
passes the state across devices (``longctx.parallel.context_linear.rwkv6`` / ``rwkv7``);
the token shift reads the previous device's last token through GSPMD (global view).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.backends.base import Mixer, MixerDims
from longctx.backends.linear import ops as linear_ops
from longctx.backends.linear.config import LinearConfig
from longctx.layers import DTYPES, param
from longctx.parallel import context, context_linear

GROUP_NORM_EPS = 64e-5  # RWKV's ln_x eps (1e-5 * head_size_divisor**2 with divisor 8)


def _group_norm(o, scale, bias):
    """LayerNorm over each head's ``V`` features: ``o [B, S, H, V]``, ``scale, bias [H, V]``."""
    mu = jnp.mean(o, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(o - mu), axis=-1, keepdims=True)
    return (o - mu) * jax.lax.rsqrt(var + GROUP_NORM_EPS) * scale + bias


def _l2norm(x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class RWKVMixer(Mixer):
    def __init__(self, dims: MixerDims, lin: LinearConfig, *, rngs: nnx.Rngs,
                 context_parallel: str = "auto"):
        self.lin = lin
        self.v7 = lin.variant == "rwkv7"
        self.context_parallel = context_parallel
        self.n_heads = H = dims.n_heads
        self.key_dim = K = lin.key_dim or dims.head_dim
        self.value_dim = V = lin.value_dim or dims.head_dim
        self.dtype = DTYPES[dims.dtype]
        E, R, std = dims.d_model, lin.rwkv_low_rank, dims.init_std
        names = ("r", "w", "k", "v", "a", "g") if self.v7 else ("w", "k", "v", "r", "g")
        self.n_mix = len(names)
        # token-shift interpolation mu_c in (0, 1) at init (RWKV inits them near 0.5)
        mu = jax.random.uniform(rngs.params(), (self.n_mix, E), jnp.float32, 0.2, 0.8)
        self.mu = param(rngs, (self.n_mix, E), (None, "embed"), value=mu)
        none = lambda: nnx.data(None)  # noqa: E731
        self.mu_x = self.mix1 = self.mix2 = none()
        if not self.v7:  # ddlerp LoRAs
            self.mu_x = param(rngs, (E,), ("embed",), value=jnp.full((E,), 0.5, jnp.float32))
            self.mix1 = param(rngs, (E, self.n_mix, R), ("embed", None, None), std=std)
            self.mix2 = param(rngs, (self.n_mix, R, E), (None, None, "embed"),
                              value=jnp.zeros((self.n_mix, R, E), jnp.float32))
        self.wr = param(rngs, (E, H, K), ("embed", "heads", "head_dim"), std=std)
        self.wk = param(rngs, (E, H, K), ("embed", "heads", "head_dim"), std=std)
        self.wv = param(rngs, (E, H, V), ("embed", "heads", "head_dim"), std=std)
        self.wo = param(rngs, (H, V, E), ("heads", "head_dim", "embed"), std=dims.out_std)
        # decay LoRA; w0 spreads the per-key decay rates (RWKV's "decay_speed" ramp)
        ramp = jnp.linspace(0.0, 1.0, K, dtype=jnp.float32)
        w0 = (-6.0 + 5.0 * ramp ** 0.7) if not self.v7 else (-4.0 + 8.0 * ramp)
        self.w0 = param(rngs, (H, K), ("heads", "head_dim"), value=jnp.tile(w0, (H, 1)))
        self.decay1 = param(rngs, (E, R), ("embed", None), std=std)
        self.decay2 = param(rngs, (R, H, K), (None, "heads", "head_dim"),
                            value=jnp.zeros((R, H, K), jnp.float32))
        self.ln_scale = param(rngs, (H, V), ("heads", "head_dim"),
                              value=jnp.ones((H, V), jnp.float32))
        self.ln_bias = param(rngs, (H, V), ("heads", "head_dim"),
                             value=jnp.zeros((H, V), jnp.float32))
        self.u = self.wg = self.a0 = self.a1 = self.a2 = none()
        self.k_k = self.k_a = self.r_k = self.g1 = self.g2 = none()
        if not self.v7:
            self.u = param(rngs, (H, K), ("heads", "head_dim"),
                           value=jnp.tile(0.5 * (1.0 - ramp) + 0.1, (H, 1)))
            self.wg = param(rngs, (E, H, V), ("embed", "heads", "head_dim"), std=std)
        else:
            self.a0 = param(rngs, (H, K), ("heads", "head_dim"),
                            value=jnp.zeros((H, K), jnp.float32))
            self.a1 = param(rngs, (E, R), ("embed", None), std=std)
            self.a2 = param(rngs, (R, H, K), (None, "heads", "head_dim"),
                            value=jnp.zeros((R, H, K), jnp.float32))
            self.k_k = param(rngs, (H, K), ("heads", "head_dim"),
                             value=jnp.full((H, K), 0.85, jnp.float32))
            self.k_a = param(rngs, (H, K), ("heads", "head_dim"),
                             value=jnp.ones((H, K), jnp.float32))
            self.r_k = param(rngs, (H, K), ("heads", "head_dim"),
                             value=jnp.zeros((H, K), jnp.float32))
            self.g1 = param(rngs, (E, R), ("embed", None), std=std)
            self.g2 = param(rngs, (R, H, V), (None, "heads", "head_dim"),
                            std=1.0 / math.sqrt(R))

    def mixing_flops(self, batch: int, seq_len: int, segment_len: int = 0) -> float:
        """The chunk form counted as gated linear attention (rwkv6) or the delta rule
        (rwkv7: its extra ``a``, ``b`` scores are of the same order); bonus not counted."""
        chunk = min(self.lin.chunk_size, segment_len or seq_len, seq_len)
        return linear_ops.chunk_flops(batch * seq_len * self.n_heads, key_dim=self.key_dim,
                                      value_dim=self.value_dim, chunk_size=chunk,
                                      delta=self.v7)

    def init_state(self, batch_size: int, dtype=jnp.float32):
        """``{"S": [B, H, K, V] float32, "shift": [B, E]}``."""
        return {"S": jnp.zeros((batch_size, self.n_heads, self.key_dim, self.value_dim),
                               jnp.float32),
                "shift": jnp.zeros((batch_size, self.mu.shape[1]), dtype)}

    def __call__(self, x, *, positions, state=None, segment_ids=None):
        del positions  # order enters through the recurrence
        name = self.lin.variant
        if segment_ids is not None:
            raise NotImplementedError(
                f"model.attention.linear.variant={name!r} does not take segment_ids "
                "(packed documents): token shift and state resets are not implemented")
        dt = self.dtype
        x = x.astype(dt)
        B, S, _ = x.shape
        prev = (jnp.zeros_like(x[:, :1]) if state is None
                else state["shift"].astype(dt)[:, None])
        xf = x.astype(jnp.float32)
        d = jnp.concatenate([prev.astype(jnp.float32), xf[:, :-1]], axis=1) - xf  # [B, S, E]
        mu = self.mu[...]
        if self.v7:
            xs = xf[None] + d[None] * mu[:, None, None]  # [n, B, S, E]
        else:  # ddlerp (data-dependent token shift)
            low = jnp.tanh(jnp.einsum("bse,enr->nbsr", xf + d * self.mu_x[...],
                                      self.mix1[...]))
            m = jnp.einsum("nbsr,nre->nbse", low, self.mix2[...])
            xs = xf[None] + d[None] * (mu[:, None, None] + m)
        xs = dict(zip(("r", "w", "k", "v", "a", "g") if self.v7 else ("w", "k", "v", "r", "g"),
                      xs))
        proj = lambda z, w_: jnp.einsum("bse,ehk->bshk", z.astype(dt), w_[...].astype(dt))  # noqa
        r, k, v = proj(xs["r"], self.wr), proj(xs["k"], self.wk), proj(xs["v"], self.wv)
        d_w = self.w0[...] + jnp.einsum("bsr,rhk->bshk", jnp.tanh(xs["w"] @ self.decay1[...]),
                                        self.decay2[...])  # [B, S, H, K] float32
        kw = dict(scale=1.0, initial_state=None if state is None else state["S"],
                  output_final_state=state is not None, chunk_size=self.lin.chunk_size,
                  form="recurrent" if state is not None and S == 1
                  else linear_ops.segment_form(self.lin.form))
        ops = linear_ops
        if state is None and context.active_strategy(self.context_parallel) is not None:
            ops = context_linear  # the sequence is split over `sequence`: state passing
            del kw["form"]  # (the token shift's one-token halo is GSPMD's, global view)
        if not self.v7:
            w = -jnp.exp(d_w)
            o, S_new = ops.rwkv6(r, k, v, w, self.u[...], **kw)
            o = _group_norm(o.astype(jnp.float32), self.ln_scale[...], self.ln_bias[...])
            o = o * jax.nn.silu(proj(xs["g"], self.wg).astype(jnp.float32))
        else:
            w = -math.exp(-0.5) * jax.nn.sigmoid(d_w)
            a_gate = jax.nn.sigmoid(self.a0[...] + jnp.einsum(
                "bsr,rhk->bshk", xs["a"] @ self.a1[...], self.a2[...]))
            kf = k.astype(jnp.float32)
            kappa = _l2norm(kf * self.k_k[...])
            kf = kf * (1.0 + (a_gate - 1.0) * self.k_a[...])
            o, S_new = ops.rwkv7(r, w, kf, v, -kappa, kappa * a_gate, **kw)
            o = _group_norm(o.astype(jnp.float32), self.ln_scale[...], self.ln_bias[...])
            bonus = jnp.sum(r.astype(jnp.float32) * kf * self.r_k[...], axis=-1, keepdims=True)
            o = o + bonus * v.astype(jnp.float32)
            gate = jnp.einsum("bsr,rhv->bshv", jax.nn.sigmoid(xs["g"] @ self.g1[...]),
                              self.g2[...])
            o = o * gate
        y = jnp.einsum("bshv,hve->bse", o.astype(dt), self.wo[...].astype(dt))
        new_state = None if state is None else {"S": S_new, "shift": x[:, -1]}
        return y, new_state
