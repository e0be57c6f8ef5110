"""The linear family's functional ops: linear attention, the delta rule (DeltaNet, Gated
DeltaNet, Kimi Delta Attention), RWKV-6 and RWKV-7. One signature for every form,
names as in flash-linear-attention::

    linear_attention(q, k, v, *, g=None, scale=None, initial_state=None,
                     output_final_state=False, normalize=False, chunk_size=64,
                     form="chunk") -> (o, final_state)
    delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, form="chunk") -> (o, final_state)
    rwkv6(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, form="chunk") -> (o, final_state)
    rwkv7(r, w, k, v, a, b, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, form="chunk") -> (o, final_state)

Layouts::

    q, k, r, w, a, b [B, T, H, K]     v [B, T, H, V]     o [B, T, H, V] (dtype of v)
    g    None | [B, T, H] | [B, T, H, K]     (log-space gates, g <= 0; w likewise, per key)
    beta [B, T, H]                            (delta rule write strength, usually in (0, 1))
    u    [H, K]                               (RWKV-6 bonus)
    initial_state, final_state [B, H, K, V] float32

Recurrences (``S_t`` is ``[K, V]`` per batch row and head, ``q_t`` a row vector)::

    linear attention:  S_t = exp(g_t) * S_{t-1} + k_t^T v_t           o_t = (scale q_t) S_t
    delta rule:        S_t = exp(g_t) * S_{t-1}
                       S_t = S_t + k_t^T (beta_t * (v_t - k_t S_t))   o_t = (scale q_t) S_t
    RWKV-6:            o_t = (scale r_t) (S_{t-1} + diag(u) k_t^T v_t)
                       S_t = diag(exp w_t) S_{t-1} + k_t^T v_t
    RWKV-7:            S_t = diag(exp w_t) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t
                       o_t = (scale r_t) S_t

``g`` is ``None`` (plain linear attention / DeltaNet), ``[B, T, H]`` (one decay per
head and step: RetNet's fixed decays, simple GLA, Gated DeltaNet) or ``[B, T, H, K]``
(a decay per key dimension, which scales the rows of ``S``: GLA, Yang et al. 2023;
for the delta rule Kimi Delta Attention, Kimi Team 2025). ``scale`` defaults to
``K ** -0.5`` for every op (RWKV-6/7 included; pass ``scale=1.0`` for RWKV's own
convention). A gate may be ``-inf``: a hard reset (``exp(-inf) = 0`` clears the
decayed part of the state before the step's write; packed documents). Every form
handles it exactly (resets are counted apart from the finite gates, so no form ever
computes ``-inf - -inf``), and its gradient is 0. In RWKV-7 the low-rank term
``b_t^T (a_t S_{t-1})`` reads the state before the decay, so a full reset also
needs ``a_t = 0`` (the mixer does that). ``final_state`` is None unless
``output_final_state``. Inputs of any float dtype are computed in float32 (states
always accumulate in float32; q, k, v stay in their dtype until each block casts its
slice, see :func:`_run`); ``o`` is cast back to the dtype of ``v``.

``normalize=True`` (linear attention only) divides ``o_t`` by
``(scale * q_t) . z_t + NORMALIZE_EPS`` with ``z_t = exp(g_t) * z_{t-1} + k_t``,
``z_0 = 0``: the keys of *this call*, decayed exactly like the state (Katharopoulos
et al. 2020 with the gate of the state). ``initial_state`` contributes to the
numerator only, as in fla; a caller that needs the normaliser across calls
carries it in the state itself by appending a column of ones to ``v`` (the
``linear`` mixer does). The normaliser is meant for positive feature maps
(elu+1, relu); ``NORMALIZE_EPS`` only guards a zero denominator.

Forms (all exact in exact arithmetic; the tests compare them on outputs, final
states and every gradient against float64 loops; drivers in
:mod:`~longctx.backends.linear.forms`, the per-block math with its derivations in
:mod:`~longctx.backends.linear.blocks`):

* ``"parallel"``: the readable quadratic reference: the whole sequence as one
  block (causal decay matrices masked *before* the exp; the delta rules through a
  ``T x T`` unit-triangular inverse).
* ``"recurrent"``: ``lax.scan`` over time, one rank-one update per step: the
  naive recurrence, and the decoding form (one token = one step).
* ``"chunk"``: the parallel chunk form (as flash-linear-attention's chunk
  algorithms; Yang et al. 2023, "Gated Linear Attention Transformers with
  Hardware-Efficient Training"): every chunk of ``chunk_size`` tokens at once as
  batched matmuls, only the ``[B, H, K, V]`` state recurrence over chunks
  sequential (an associative scan for diagonal decays), gates cumulated from each
  chunk start (every exponent ``<= 0`` at any length: a gate of -8 per step over a
  million tokens stays finite); scratch memory linear in ``T``. Per-key gates
  (GLA, KDA, RWKV-6/7): one factored score matmul per chunk when that is exact for
  the whole input, else GLA sub-chunks with explicit decays (see :func:`_run`).
* ``"chunk_scan"``: the sequential chunk form (one ``lax.scan`` step per chunk);
  the benchmark baseline. Not in :data:`FORMS` (the forms the tests' ladder runs),
  accepted everywhere.

Gradients are plain JAX autodiff of these forms (no custom VJP).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from longctx import targets
from longctx.backends.linear import blocks, forms
from longctx.kernels import delta_rule as pallas_delta
from longctx.kernels import linear_attention as pallas_linear

log = logging.getLogger(__name__)

FORMS = ("chunk", "recurrent", "parallel")
BASELINE_FORMS = ("chunk_scan",)  # the sequential chunk form (benchmark baseline)
NORMALIZE_EPS = 1e-6  # guards a zero normaliser only; see the module docstring
GLA_SUBCHUNK = 16  # secondary-level chunk for per-key gates (GLA paper)
unit_lower_inverse = blocks.unit_lower_inverse  # the UT transform (re-exported)


# ----------------------------------------------------------------------------
# Checks: shapes and options, with the offending values in the message.
# ----------------------------------------------------------------------------


def _check_form(name, form, chunk_size):
    if form not in FORMS + BASELINE_FORMS:
        raise ValueError(f"{name}: unknown {form=!r}; expected one of {FORMS + BASELINE_FORMS}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: {chunk_size=} must be a positive int")


def _check(name, q, k, v, g, beta, initial_state, form, chunk_size, per_key_ok=True,
           names=("q", "k")):
    _check_form(name, form, chunk_size)
    nq, nk = names
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{name} expects {nq}, {nk} [B, T, H, K] and v [B, T, H, V]; got "
                         f"{nq}.shape={q.shape} {nk}.shape={k.shape} {v.shape=}")
    if k.shape != q.shape:
        raise ValueError(f"{name}: {nq} and {nk} must have the same shape [B, T, H, K]; got "
                         f"{nq}.shape={q.shape} {nk}.shape={k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}: v must agree with {nq} on [B, T, H]; got "
                         f"{nq}.shape={q.shape} {v.shape=}")
    B, T, H, K = q.shape
    V = v.shape[3]
    if g is not None:
        shapes = ((B, T, H), (B, T, H, K)) if per_key_ok else ((B, T, H, K),)
        if g.shape not in shapes:
            raise ValueError(f"{name}: g must be one of the shapes "
                             f"{' or '.join(map(str, shapes))} (None: no gate); got {g.shape=}")
    if beta is not None and beta.shape != (B, T, H):
        raise ValueError(f"{name}: beta must be [B, T, H] = {(B, T, H)}; got {beta.shape=}")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"{name}: initial_state must be [B, H, K, V] = {(B, H, K, V)}; got "
                         f"{initial_state.shape=}")


def _same_shape(name, ref_name, ref, **arrays):
    for n, x in arrays.items():
        if x.shape != ref.shape:
            raise ValueError(f"{name}: {n} must have the shape of {ref_name} [B, T, H, K] = "
                             f"{ref.shape}; got {n}.shape={x.shape}")


def _f32(x):
    return None if x is None else jnp.asarray(x).astype(jnp.float32)


def _float32(scale):
    """The cast each block / step applies to its inputs: float32, queries times ``scale``."""
    def prep(xs):
        # The barrier keeps the cast where it is written: without it XLA moved the convert
        # of a step's slice out of the chunk scan, back to float32 copies of whole sequences.
        xs = jax.lax.optimization_barrier(xs)
        xs = tuple(None if x is None else x.astype(jnp.float32) for x in xs)
        return (xs[0] * scale,) + xs[1:]
    return prep


def _run(form, block, step, xs, S0, chunk_size, per_key_gate=None, *, scale=1.0,
         out_dtype=jnp.float32):
    """Dispatch to a form; ``xs`` are ``[B, T, H, ...]`` (queries first), ``S0 [B, H, K, V]``
    float32; returns ``o`` (``out_dtype`` from the chunk forms, float32 from the others) and
    the final state (float32).

    The sequence-long inputs stay in the caller's dtype (gates and ``beta`` come float32)
    and each block or step casts its own slice to float32 and scales the queries
    (:func:`_float32`; exact: a bf16 value is a float32 value). So the chunk forms' padded,
    chunked copies, their output and the cotangents of all of them are bf16 when the model
    computes in bf16, where casting whole sequences up front kept float32 copies of q, k,
    v and o for the backward: linear attention then took more memory than exact attention
    (issue 31). Every product and the state are float32 as before.

    ``per_key_gate``: the op's ``[B, T, H, K]`` log gate (None: none or scalar). The chunk
    forms then compute their per-key scores by one factored matmul per chunk
    (``blocks.FACTORED``) when :func:`~longctx.backends.linear.blocks.factored_ok` holds
    for the whole input, else by GLA sub-chunks of ``GLA_SUBCHUNK`` with explicit decays
    (resets, or more than ``blocks.FACTOR_MAX_EXP`` of log decay in half a chunk): a
    ``lax.cond`` on that traced flag, so both are exact and only one runs. The fallback is
    rematerialised in the backward pass, so the fast branch carries no zero-filled
    residuals of the fallback's ``[C, c, K]`` decays.
    """
    prep = _float32(scale)

    def cast_block(*x, sub):
        return block(*prep(x), sub=sub)

    if form == "parallel":
        return forms.parallel(functools.partial(cast_block, sub=None), xs, S0)
    if form == "recurrent":
        return forms.recurrent(lambda S, x: step(S, prep(x)), xs, S0)
    run = forms.chunk_scan if form == "chunk_scan" else forms.chunk

    def with_sub(sub):
        return lambda xs, S0: run(functools.partial(cast_block, sub=sub), xs, S0, chunk_size,
                                  out_dtype=out_dtype)

    if per_key_gate is None:
        return with_sub(GLA_SUBCHUNK)(xs, S0)
    return jax.lax.cond(blocks.factored_ok(per_key_gate, chunk_size), with_sub(blocks.FACTORED),
                        jax.checkpoint(with_sub(GLA_SUBCHUNK)), xs, S0)


_FORM_LOGGED: set = set()


def segment_form(form: str) -> str:
    """``model.attention.linear.form`` -> the form the mixers run a multi-token segment with.

    ``auto``, by the platform compiled for (:func:`longctx.targets.platform`):
    ``chunk_scan`` (chunks one after another) on CPU, where the parallel ``chunk`` form
    showed no clear win by CPU time (``python -m experiments.bench_linear``;
    docs/results/linear_forms.md); ``chunk`` on GPU / TPU, where many chunks' matmuls in
    one batch is the point. Logged once per choice.
    """
    if form != "auto":
        return form
    where = targets.platform()  # the devices being compiled for decide
    chosen = "chunk_scan" if where == "cpu" else "chunk"
    if chosen not in _FORM_LOGGED:
        _FORM_LOGGED.add(chosen)
        log.info("linear attention: form=auto runs %r on %s", chosen, where)
    return chosen


def _per_key(g, q):
    """``g`` if it is a per-key gate ``[B, T, H, K]`` (see :func:`_run`), else None."""
    return g if g is not None and g.ndim == q.ndim else None


def _start_state(S0, B, H, K, V):
    return jnp.zeros((B, H, K, V), jnp.float32) if S0 is None else S0


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def chunk_flops(tokens: int, *, key_dim: int, value_dim: int, chunk_size: int,
                delta: bool) -> float:
    """Forward matmul FLOPs of the chunk form for ``tokens`` (token, head) pairs.

    Per chunk of ``C`` tokens and head (``2 m n k`` per matmul), linear attention
    (:func:`~longctx.backends.linear.blocks.linear_block`): scores ``q k^T`` ``2C^2 K``,
    ``A v`` ``2C^2 V``, the chunk's state ``k^T v`` ``2CKV`` and the read of the start
    state ``q_eff S_0`` ``2CKV``. The delta rule
    (:func:`~longctx.backends.linear.blocks.delta_block`) adds ``k k^T`` (``2C^2 K``),
    the UT inverse (:func:`unit_lower_inverse`: ``sum_m 2 P m^2`` over its levels,
    ``P`` = ``C`` rounded up to a power of two), its product with ``[v, k]``
    (``2C^2 (V + K)``), ``P W`` (``2C^2 K``), the transition ``Kd^T W`` (``2CK^2``) and
    its product with the state ``M S`` (``2K^2 V``). Per-key gates (GLA) are counted as
    one score matmul. Elementwise work (gates, decays, the diagonal state scan) is not
    counted.
    """
    C, K, V = chunk_size, key_dim, value_dim
    per_chunk = 2 * C * C * (K + V) + 4 * C * K * V
    if delta:
        P = 1 << max(C - 1, 0).bit_length()
        inverse = sum(2 * P * (1 << i) ** 2 for i in range(P.bit_length() - 1))
        per_chunk += (2 * C * C * K + inverse + 2 * C * C * (V + K) + 2 * C * C * K
                      + 2 * C * K * K + 2 * K * K * V)
    return float(tokens) * per_chunk / C


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None,
                     output_final_state=False, normalize=False, chunk_size=64, form="chunk"):
    """(Gated) linear attention; see the module docstring for shapes and forms.

    ``S_t = exp(g_t) * S_{t-1} + k_t^T v_t``, ``o_t = (scale * q_t) S_t``.
    Returns ``(o [B, T, H, V], final_state [B, H, K, V] float32 or None)``.
    ``form="pallas"``: the Pallas kernel of ``longctx.kernels.linear_attention``
    (GPU/TPU only; no ``normalize``); never chosen automatically.
    """
    if form == "pallas":
        if normalize:
            raise ValueError("linear_attention: form='pallas' has no normalize; use form='chunk'")
        return pallas_linear.linear_attention(
            q, k, v, g=g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size)
    _check("linear_attention", q, k, v, g, None, initial_state, form, chunk_size)
    out_dtype = v.dtype
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    g, S0 = map(_f32, (g, initial_state))
    V = v.shape[-1]
    S0 = _start_state(S0, B, H, K, V)
    if normalize:  # the normaliser z_t rides along as an extra value column of ones
        v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
        S0 = jnp.concatenate([S0, jnp.zeros_like(S0[..., :1])], axis=-1)
    o, S = _run(form, blocks.linear_block, forms.linear_step, (q, k, v, g), S0, chunk_size,
                _per_key(g, q), scale=scale,
                out_dtype=jnp.float32 if normalize else out_dtype)  # normalise in float32
    if normalize:
        o = o[..., :V] / (o[..., V:] + NORMALIZE_EPS)
        S = S[..., :V]
    return o.astype(out_dtype), (S if output_final_state else None)


def delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, form="chunk"):
    """DeltaNet (``g=None``), Gated DeltaNet (``g [B, T, H]``) and Kimi Delta Attention
    (``g [B, T, H, K]``, a decay per key); see the module docstring.

    ``S_t = exp(g_t) S_{t-1}; S_t += k_t^T (beta_t (v_t - k_t S_t)); o_t = (scale q_t) S_t``.
    Keys are used as given (the layer L2-normalises them: with ``|k| <= 1`` and
    ``beta`` in ``(0, 1)`` the map ``I - beta k^T k`` of every step is non-expansive).
    Returns ``(o [B, T, H, V], final_state [B, H, K, V] float32 or None)``.
    ``form="pallas"``: the Pallas kernel of ``longctx.kernels.delta_rule`` (GPU/TPU only).
    """
    if form == "pallas":
        return pallas_delta.delta_rule(q, k, v, beta, g=g, scale=scale,
                                       initial_state=initial_state,
                                       output_final_state=output_final_state,
                                       chunk_size=chunk_size)
    _check("delta_rule", q, k, v, g, beta, initial_state, form, chunk_size)
    out_dtype = v.dtype
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    beta, g, S0 = map(_f32, (beta, g, initial_state))
    S0 = _start_state(S0, B, H, K, v.shape[-1])
    o, S = _run(form, blocks.delta_block, forms.delta_step, (q, k, v, beta, g), S0,
                chunk_size, _per_key(g, q), scale=scale, out_dtype=out_dtype)
    return o.astype(out_dtype), (S if output_final_state else None)


def rwkv6(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, form="chunk"):
    """RWKV-6 (Peng et al. 2024, "Eagle and Finch"): per-key data-dependent decay and a bonus.

    ``o_t = (scale r_t) (S_{t-1} + diag(u) k_t^T v_t)``, ``S_t = diag(exp w_t) S_{t-1} +
    k_t^T v_t``: the read is of the state *before* step t (exclusive), the current
    token enters through the bonus ``u [H, K]``. ``w [B, T, H, K]`` is the log decay
    (``<= 0``; ``-inf`` resets). Returns ``(o [B, T, H, V], final_state or None)``.
    """
    _check("rwkv6", r, k, v, None, None, initial_state, form, chunk_size, names=("r", "k"))
    _same_shape("rwkv6", "r", r, w=w)
    B, T, H, K = r.shape
    if u.shape != (H, K):
        raise ValueError(f"rwkv6: u must be [H, K] = {(H, K)}; got {u.shape=}")
    out_dtype = v.dtype
    scale = K ** -0.5 if scale is None else scale
    w, u, S0 = map(_f32, (w, u, initial_state))
    # [B, T, H]: the bonus coefficient r_t diag(u) k_t^T (float32; fused, nothing kept)
    ruk = jnp.sum(_f32(r) * scale * u * _f32(k), axis=-1)
    S0 = _start_state(S0, B, H, K, v.shape[-1])
    o, S = _run(form, blocks.rwkv6_block, forms.rwkv6_step, (r, k, v, w, ruk), S0, chunk_size,
                w, scale=scale, out_dtype=out_dtype)
    return o.astype(out_dtype), (S if output_final_state else None)


def rwkv7(r, w, k, v, a, b, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, form="chunk"):
    """RWKV-7 (Peng et al. 2025, "Goose"): the generalized delta rule, diagonal plus low rank.

    ``S_t = diag(exp w_t) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t``,
    ``o_t = (scale r_t) S_t``; ``w [B, T, H, K]`` log decay, ``a, b [B, T, H, K]`` the
    low-rank transition (RWKV-7: ``a = -kappa_hat``, ``b = kappa_hat * a_gate``; the
    delta rule is ``a = k``, ``b = -beta k`` with the decay applied first). The chunk
    form uses the WY / UT representation
    (:func:`~longctx.backends.linear.blocks.rwkv7_block`).
    Returns ``(o [B, T, H, V], final_state [B, H, K, V] float32 or None)``.
    """
    _check("rwkv7", r, k, v, None, None, initial_state, form, chunk_size, names=("r", "k"))
    _same_shape("rwkv7", "r", r, w=w, a=a, b=b)
    B, T, H, K = r.shape
    out_dtype = v.dtype
    scale = K ** -0.5 if scale is None else scale
    w, S0 = map(_f32, (w, initial_state))
    S0 = _start_state(S0, B, H, K, v.shape[-1])
    o, S = _run(form, blocks.rwkv7_block, forms.rwkv7_step, (r, w, k, v, a, b), S0,
                chunk_size, w, scale=scale, out_dtype=out_dtype)
    return o.astype(out_dtype), (S if output_final_state else None)
