"""The ``linear`` token mixer: linear attention, RetNet, GLA, DeltaNet, Gated DeltaNet.

One layer, the variant chosen by ``model.attention.linear.variant``; the math is
in :mod:`longctx.backends.linear.ops` (``linear_attention`` / ``delta_rule``),
the section in :mod:`longctx.backends.linear.config`::

    x [B, S, E] -> q, k [B, S, H, K], v [B, S, H, V]     (projections, H = model.n_heads)
               -> short causal depthwise conv on q, k, v (conv_size > 0; its tail is state)
               -> feature map on q, k (identity | elu1 | relu | silu; hedgehog: learned,
                  softmax([x W, -x W]) per head, 2K features, see :func:`hedgehog`)
               -> gates and the recurrence of the variant (state S [B, H, K, V] float32)
               -> RMSNorm per head -> * silu(x W_gate) -> output projection [B, S, E]

Variants (gates in log space, ``g <= 0``):

* ``linear``: ``g = None``, feature map elu+1 (Katharopoulos et al. 2020,
  "Transformers are RNNs"). ``normalize=true`` adds their denominator.
* ``retnet``: fixed decay per head ``gamma_h = 1 - 2^(-5-h)``, ``g = log gamma_h``
  (Sun et al. 2023, "Retentive Network", multi-scale retention). RetNet's xPos
  rotation is not used: position enters through the decay only.
* ``gla``: per-key data-dependent gate ``g = logsigmoid(x W1 W2 + b) / 16`` with a
  rank-16 ``W1 W2`` (config ``gate_normalizer``, ``gate_low_rank``; Yang et al.
  2023, "Gated Linear Attention Transformers"); the bias starts at 0 or at RetNet's
  decays (``gate_bias_init``, see :func:`gla_gate_bias`).
* ``deltanet``: the delta rule with ``beta = sigmoid(x W_beta)`` and L2-normalised
  q, k after a SiLU feature map (Yang et al. 2024, "Parallelizing Linear
  Transformers with the Delta Rule").
* ``gated_deltanet``: DeltaNet plus Mamba-2's decay
  ``g = -exp(A) * softplus(x W_a + dt_bias)`` per head (Yang, Kautz,
  Hatamizadeh 2024, "Gated Delta Networks"; ``A`` and ``dt_bias``
  initialised as in Mamba-2).
* ``kda``: Kimi Delta Attention (Kimi Team 2025, "Kimi Linear"): Gated DeltaNet
  with a decay per key, ``g = -exp(A_h) * softplus(x W1 W2 + dt_bias)``
  ``[B, S, H, K]`` with a rank-``gate_low_rank`` ``W1 W2`` (``A``, ``dt_bias`` per
  head / per key, Mamba-2 init).

State protocol: ``init_state(B, dtype)`` is ``{"S": [B, H, K, V'] float32,
"seg": [B, max(conv_size - 1, 1)] int32}`` (``seg``: see ``segment_ids`` below)
plus, with a short conv, ``"conv": {"q", "k", "v"}`` holding the last
``conv_size - 1`` projected inputs ``[B, conv_size - 1, H, K or V]``. With ``normalize`` the state
has ``V' = V + 1`` columns: the last one is the decayed key sum ``z`` (the
normaliser rides along as a value column of ones), so segments and decoding
normalise exactly as the one-pass forward. ``state=None``: the chunk form over
the segment, ``new_state`` None. With a state: the chunk form for a segment of
``S > 1`` tokens, the recurrent form for ``S == 1`` (decoding); both are exact.

``positions`` are not used (no RoPE: order enters through the recurrence).

``segment_ids [B, S]`` (packed documents): no information crosses a document
boundary. The first token of a document gets the log-gate ``-inf`` (a hard
reset of ``S`` before its write, which every kernel form takes exactly), and the
short conv only sums taps of the same document. To find the boundary at the
start of a segment the state also carries the ids of the last ``max(conv_size -
1, 1)`` tokens (``"seg"``); a fresh state's ids are 0, and a "boundary" with
the zero initial state changes nothing.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from longctx import targets
from longctx.backends.base import Mixer, MixerDims
from longctx.backends.linear import ops as linear_ops
from longctx.backends.linear.config import DELTA_VARIANTS, RWKV_VARIANTS, LinearConfig
from longctx.backends.linear.rwkv_mixer import RWKVMixer
from longctx.layers import DTYPES, causal_conv, grads_together, param
from longctx.parallel import context, context_linear

# Nested checkpoints in the stateless (training) call, by the platform compiled for: the
# layer runs as
#   remat(features + recurrence, with remat(features) inside) -> remat(readout)
# so its backward keeps only the sections' boundaries (the input x, the recurrence's
# output o) plus one section's inside at a time. Under the block's `remat: full` the
# backward recomputes the block, then holds its intermediates all at once: with the
# layer's many elementwise stages (short convs, SiLU, L2 norms, gates, output norm and
# gate) that is several [B, S, H, K] copies more than exact attention keeps, and the
# recurrence's chunked inputs through the whole feed-forward backward. Recomputation
# only: outputs and gradients are unchanged (tests/test_linear_mixer.py), at the price
# of one more forward of the features and the recurrence per layer in the backward.
# GPU / TPU: on (HBM is what bounds the context; the 1B on a v5p-8:
# docs/results/frontier_targets.md). CPU: off (host
# memory is rarely the bound there and the CPU sweep's step time is the measure; the
# extra forward would cost it). A platform not listed: on.
REMAT_SECTIONS = {"cpu": False, "gpu": True, "tpu": True}

FEATURE_MAPS = {  # the fixed ones of longctx.backends.linear.config.FEATURE_MAPS (+ hedgehog)
    "identity": lambda x: x,
    "elu1": lambda x: jax.nn.elu(x) + 1.0,  # Katharopoulos et al. 2020: positive features
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def hedgehog(x, w):
    """Hedgehog's learned feature map (Zhang et al. 2024, "The Hedgehog & the Porcupine"):
    ``phi(x) = softmax([x W, -x W])`` over the ``2 K'`` features, per head.

    ``x [B, S, H, K]``, ``w [H, K, K']`` -> ``[B, S, H, 2 K']`` (positive, summing to 1;
    computed in float32, returned in ``x``'s dtype). The mixer starts ``W`` at the identity
    (as fla's ``HedgehogFeatureMap``; no bias, no factor 2): ``phi(q) . phi(k)`` is then a
    sum of products of exponentials of the raw q, k features — spiky and monotonic in
    ``q . k`` like softmax attention, which LoLCATs (Zhang et al. 2025) then trains to
    match. Each position is mapped on its own, so causality is the recurrence's.
    """
    z = jnp.einsum("bshk,hkf->bshf", x.astype(jnp.float32), w.astype(jnp.float32))
    return jax.nn.softmax(jnp.concatenate([z, -z], axis=-1), axis=-1).astype(x.dtype)


def retnet_log_decay(n_heads: int):
    """``log(1 - 2^(-5-h))`` for h = 0..H-1 (RetNet's multi-scale decays): ``[H]`` float32."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(n_heads, dtype=jnp.float32))))


def gla_gate_bias(n_heads: int, key_dim: int, lin: LinearConfig):
    """Initial GLA gate bias ``[H, K]`` (config ``gate_bias_init``).

    ``"zero"`` (fla's init): every key forgets at 0.958 per step at init, an effective
    window of ~23 tokens. ``"retnet"``: ``b_h = logit(gamma_h ** gate_normalizer)``, so
    that at ``x W1 W2 = 0`` ``logsigmoid(b_h) / gate_normalizer = log gamma_h``: GLA
    starts as RetNet (same function and gradients with ``W1 = 0``, checked) and learns
    the data dependence. On tiny MQAR (600 steps) neither init changed the result
    (held-out 0.021 zero vs 0.011 retnet), which is seed-dominated at that budget.
    """
    if lin.gate_bias_init == "zero":
        return jnp.zeros((n_heads, key_dim), jnp.float32)
    p = jnp.exp(retnet_log_decay(n_heads) * lin.gate_normalizer)  # sigmoid(b) = gamma^N
    b = jnp.log(p) - jnp.log1p(-p)
    return jnp.broadcast_to(b[:, None], (n_heads, key_dim)).astype(jnp.float32)


def _proj(x, w):
    """``x [B, S, E] @ w [E, H]`` in ``x``'s dtype with a float32 result."""
    return jnp.einsum("bse,eh->bsh", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _l2norm(x, eps=1e-6):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class LinearAttention(Mixer):
    def __init__(self, dims: MixerDims, lin: LinearConfig, *, rngs: nnx.Rngs,
                 context_parallel: str = "auto"):
        self.lin = lin  # frozen dataclass: static
        # model.attention.context_parallel: with the mesh splitting the sequence, the
        # stateless call passes the state across devices (longctx.parallel.context_linear).
        self.context_parallel = context_parallel
        self.n_heads = H = dims.n_heads
        self.key_dim = K = lin.key_dim or dims.head_dim
        self.value_dim = V = lin.value_dim or dims.head_dim
        self.dtype = DTYPES[dims.dtype]
        self.feature_map = lin.resolved_feature_map
        E, W = dims.d_model, lin.conv_size
        std, out_std = dims.init_std, dims.out_std
        self.wq = param(rngs, (E, H, K), ("embed", "heads", "head_dim"), std=std)
        self.wk = param(rngs, (E, H, K), ("embed", "heads", "head_dim"), std=std)
        self.wv = param(rngs, (E, H, V), ("embed", "heads", "head_dim"), std=std)
        self.wo = param(rngs, (H, V, E), ("heads", "head_dim", "embed"), std=out_std)

        def conv(D):  # PyTorch Conv1d's default init for a depthwise kernel: U(+-1/sqrt(W))
            if not W:
                return nnx.data(None)
            b = 1 / math.sqrt(W)
            value = jax.random.uniform(rngs.params(), (W, H, D), jnp.float32, -b, b)
            return param(rngs, (W, H, D), (None, "heads", "head_dim"), value=value)

        self.conv_q, self.conv_k, self.conv_v = conv(K), conv(K), conv(V)
        # the recurrence's key features: 2K with the hedgehog map, else K
        self.feature_dim = 2 * K if self.feature_map == "hedgehog" else K
        self.hedgehog_q = self.hedgehog_k = nnx.data(None)
        if self.feature_map == "hedgehog":  # separate maps for q and k, from the identity
            eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (H, K, K))
            self.hedgehog_q = param(rngs, (H, K, K), ("heads", None, None), value=eye)
            self.hedgehog_k = param(rngs, (H, K, K), ("heads", None, None), value=eye)
        none = lambda: nnx.data(None)  # noqa: E731
        self.w_gate1 = self.w_gate2 = self.b_gate = none()
        self.w_beta = self.w_a = self.a_log = self.dt_bias = none()
        if lin.variant == "gla":
            r = lin.gate_low_rank
            self.w_gate1 = param(rngs, (E, r), ("embed", None), std=std)
            self.w_gate2 = param(rngs, (r, H, K), (None, "heads", "head_dim"), std=std)
            self.b_gate = param(rngs, (H, K), ("heads", "head_dim"),
                                value=gla_gate_bias(H, K, lin))
        if lin.variant in DELTA_VARIANTS:
            self.w_beta = param(rngs, (E, H), ("embed", "heads"), std=std)
        if lin.variant == "kda":
            r = lin.gate_low_rank
            self.w_gate1 = param(rngs, (E, r), ("embed", None), std=std)
            self.w_gate2 = param(rngs, (r, H, K), (None, "heads", "head_dim"), std=std)
        if lin.variant in ("gated_deltanet", "kda"):
            if lin.variant == "gated_deltanet":
                self.w_a = param(rngs, (E, H), ("embed", "heads"), std=std)
            # Mamba-2 init: A ~ U(1, 16), dt ~ logU(1e-3, 1e-1), dt_bias = softplus^-1(dt).
            a = jax.random.uniform(rngs.params(), (H,), jnp.float32, 1.0, 16.0)
            dt = jnp.exp(jax.random.uniform(rngs.params(), (H,), jnp.float32,
                                            math.log(1e-3), math.log(1e-1)))
            dt_bias = dt + jnp.log(-jnp.expm1(-dt))
            self.a_log = param(rngs, (H,), ("heads",), value=jnp.log(a))
            if lin.variant == "kda":  # one dt bias per key (the gate is per key)
                self.dt_bias = param(rngs, (H, K), ("heads", "head_dim"),
                                     value=jnp.broadcast_to(dt_bias[:, None], (H, K)))
            else:
                self.dt_bias = param(rngs, (H,), ("heads",), value=dt_bias)
        self.norm_scale = nnx.data(None if not lin.output_norm else param(
            rngs, (V,), ("head_dim",), value=jnp.ones((V,), jnp.float32)))
        self.w_out_gate = nnx.data(None if not lin.output_gate else param(
            rngs, (E, H, V), ("embed", "heads", "head_dim"), std=std))

    @classmethod
    def from_config(cls, dims: MixerDims, attention, *, rngs: nnx.Rngs) -> Mixer:
        if attention.section("linear").variant in RWKV_VARIANTS:  # their own layer
            return RWKVMixer(dims, attention.section("linear"), rngs=rngs,
                             context_parallel=attention.context_parallel)
        return cls(dims, attention.section("linear"), rngs=rngs,
                   context_parallel=attention.context_parallel)

    def mixing_flops(self, batch: int, seq_len: int, segment_len: int = 0) -> float:
        """The chunk form's matmuls (:func:`~longctx.backends.linear.ops.chunk_flops`);
        chunks never span segments, so a segment shorter than a chunk is one chunk."""
        chunk = min(self.lin.chunk_size, segment_len or seq_len, seq_len)
        V = self.value_dim + int(self.lin.normalize)  # the normaliser rides as a value column
        return linear_ops.chunk_flops(batch * seq_len * self.n_heads, key_dim=self.feature_dim,
                                      value_dim=V, chunk_size=chunk,
                                      delta=self.lin.variant in DELTA_VARIANTS)

    # -- state protocol -------------------------------------------------------

    def init_state(self, batch_size: int, dtype=jnp.float32):
        """``{"S": [B, H, F, V(+1)] float32, "seg": [B, max(W-1, 1)] int32}`` + conv tails
        (``F`` the key features: ``K``, or ``2K`` with the hedgehog map)."""
        B, H, K, V, W = batch_size, self.n_heads, self.key_dim, self.value_dim, self.lin.conv_size
        state = {"S": jnp.zeros((B, H, self.feature_dim, V + int(self.lin.normalize)),
                                jnp.float32),
                 "seg": jnp.zeros((B, max(W - 1, 1)), jnp.int32)}  # ids of the last tokens
        if W:
            state["conv"] = {"q": jnp.zeros((B, W - 1, H, K), dtype),
                             "k": jnp.zeros((B, W - 1, H, K), dtype),
                             "v": jnp.zeros((B, W - 1, H, V), dtype)}
        return state

    def _features(self, x, tails, seg_ext):
        """Projections -> short conv -> feature map (-> L2 norm) and the gates:
        ``(q, k, v, beta, g, new conv tails)`` (see the module docstring)."""
        lin, dt = self.lin, self.dtype
        B, S, _ = x.shape
        W = lin.conv_size
        q = jnp.einsum("bse,ehk->bshk", x, self.wq[...].astype(dt))  # [B, S, H, K]
        k = jnp.einsum("bse,ehk->bshk", x, self.wk[...].astype(dt))  # [B, S, H, K]
        v = jnp.einsum("bse,ehv->bshv", x, self.wv[...].astype(dt))  # [B, S, H, V]
        new_tails = None
        if W:
            q, tq = causal_conv(q, self.conv_q[...], tails["q"], seg_ext)
            k, tk = causal_conv(k, self.conv_k[...], tails["k"], seg_ext)
            v, tv = causal_conv(v, self.conv_v[...], tails["v"], seg_ext)
            new_tails = {"q": tq, "k": tk, "v": tv}
        if self.feature_map == "hedgehog":  # learned: [B, S, H, 2K]
            q, k = hedgehog(q, self.hedgehog_q[...]), hedgehog(k, self.hedgehog_k[...])
        else:
            fmap = FEATURE_MAPS[self.feature_map]
            q, k = fmap(q), fmap(k)
        xf = x.astype(jnp.float32)  # gates in float32
        g = beta = None
        if lin.variant == "retnet":
            g = jnp.broadcast_to(retnet_log_decay(self.n_heads), (B, S, self.n_heads))
        elif lin.variant == "gla":
            low = jnp.einsum("bse,er->bsr", xf, self.w_gate1[...])
            logits = jnp.einsum("bsr,rhk->bshk", low, self.w_gate2[...]) + self.b_gate[...]
            g = jax.nn.log_sigmoid(logits) / lin.gate_normalizer  # [B, S, H, K]
        elif lin.variant in DELTA_VARIANTS:
            q, k = _l2norm(q), _l2norm(k)
            # the per-head gates' projections take x in the compute dtype, accumulating in
            # float32 (as fla's bf16 Linear layers): a float32 copy of x [B, S, E] and its
            # cotangent would outweigh the [B, S, H] gates themselves
            beta = jax.nn.sigmoid(_proj(x, self.w_beta[...]))  # [B, S, H]
            if lin.variant == "gated_deltanet":
                dt_ = jax.nn.softplus(_proj(x, self.w_a[...]) + self.dt_bias[...])
                g = -jnp.exp(self.a_log[...]) * dt_  # [B, S, H]
            if lin.variant == "kda":  # a decay per key from a low-rank projection
                low = jnp.einsum("bse,er->bsr", xf, self.w_gate1[...])
                dt_ = jax.nn.softplus(jnp.einsum("bsr,rhk->bshk", low, self.w_gate2[...])
                                      + self.dt_bias[...])
                g = -jnp.exp(self.a_log[...])[:, None] * dt_  # [B, S, H, K]
        return q, k, v, beta, g, new_tails

    def _mix(self, x, *, tails, seg_ext, reset, state, remat):
        """:meth:`_features` (through ``remat``) then the recurrence:
        ``(o [B, S, H, V(+1)], final state or None, new conv tails)``."""
        lin = self.lin
        B, S, _ = x.shape
        q, k, v, beta, g, new_tails = remat(self._features)(x, tails, seg_ext)
        if reset is not None:  # -inf at the first token of each document: a hard reset
            H = self.n_heads
            g = (jnp.broadcast_to(reset, (B, S, H)) if g is None
                 else g + (reset[..., None] if g.ndim == 4 else reset))
        if lin.normalize:  # the normaliser z_t is the last value column (module docstring)
            v = jnp.concatenate([v.astype(jnp.float32),
                                 jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
        kw = dict(g=g, initial_state=None if state is None else state["S"],
                  output_final_state=state is not None, chunk_size=lin.chunk_size,
                  form="recurrent" if state is not None and S == 1
                  else linear_ops.segment_form(lin.form))
        ops = linear_ops
        if state is None and context.active_strategy(self.context_parallel) is not None:
            ops = context_linear  # the sequence is split over `sequence`: state passing
            del kw["form"]
        else:
            context.note_gspmd("linear attention", "model.attention.context_parallel=none"
                               if state is None else "it carries a state (decoding, or "
                               "segments of model.segment_len)")
        if beta is not None:
            o, S_new = ops.delta_rule(q, k, v, beta, **kw)
        else:
            o, S_new = ops.linear_attention(q, k, v, **kw)
        return o, S_new, new_tails

    def _readout(self, o, x):
        """The recurrence's output ``o [B, S, H, V(+1)]`` -> (normaliser) -> per-head
        RMSNorm -> swish output gate -> output projection ``[B, S, E]``."""
        lin, dt = self.lin, self.dtype
        o = o.astype(jnp.float32)  # [B, S, H, V(+1)]
        if lin.normalize:
            o = o[..., :-1] / (o[..., -1:] + linear_ops.NORMALIZE_EPS)
        if self.norm_scale is not None:  # RMSNorm over each head's V features
            o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6)
            o = o * self.norm_scale[...]
        o = o.astype(dt)
        wo = self.wo[...].astype(dt)
        if self.w_out_gate is not None:  # swish output gate (as in GLA and RetNet)
            # the cotangents of o and x wait for the weights' gradients (grads_together)
            o, x, w_gate, wo = grads_together(o, x, self.w_out_gate[...].astype(dt), wo)
            o = o * jax.nn.silu(jnp.einsum("bse,ehv->bshv", x, w_gate))
        else:
            o, wo = grads_together(o, wo)
        return jnp.einsum("bshv,hve->bse", o, wo)

    def __call__(self, x, *, positions, state=None, segment_ids=None):
        del positions  # order enters through the recurrence (see the module docstring)
        lin, dt = self.lin, self.dtype
        x = x.astype(dt)
        B, S, _ = x.shape
        W = lin.conv_size
        new_state = None if state is None else {}
        seg_ext = reset = None  # document ids with the carried ones in front; reset gate
        if segment_ids is not None:
            seg = segment_ids.astype(jnp.int32)
            prev = state["seg"] if state is not None else jnp.full(
                (B, max(W - 1, 1)), -1, jnp.int32)  # no state: nothing before to mask
            seg_ext = jnp.concatenate([prev, seg], axis=1)  # [B, max(W-1, 1) + S]
            first = seg != seg_ext[:, -S - 1:-1]  # first token of a document
            if state is None:
                first = first.at[:, 0].set(False)
            reset = jnp.where(first, -jnp.inf, 0.0)[:, :, None]  # [B, S, 1] log-gate
            seg_ext = seg_ext[:, -(W - 1 + S):] if W else None
        if state is not None:
            ids = jnp.zeros((B, S), jnp.int32) if segment_ids is None else segment_ids
            new_state["seg"] = jnp.concatenate(
                [state["seg"], ids.astype(jnp.int32)], axis=1)[:, -state["seg"].shape[1]:]
        tails = None
        if W:
            tails = state["conv"] if state is not None else self.init_state(B, dt)["conv"]
        # without a state (training): nested checkpoints, see REMAT_SECTIONS
        nested = state is None and REMAT_SECTIONS.get(targets.platform(), True)
        remat = jax.checkpoint if nested else (lambda f: f)
        o, S_new, new_tails = remat(functools.partial(
            self._mix, tails=tails, seg_ext=seg_ext, reset=reset, state=state,
            remat=remat))(x)
        y = remat(self._readout)(o, x)
        if state is not None:
            new_state["S"] = S_new
            if W:
                new_state["conv"] = new_tails
        return y, new_state
