"""Chunked (gated) delta rule and Kimi Delta Attention: the state recurrence as one Pallas
kernel, forward and backward (``form="pallas"``), with its pure-JAX reference beside it.

Same contract as ``longctx.backends.linear.ops.delta_rule``::

    delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, interpret=False)
        -> (o [B, T, H, V], final_state [B, H, K, V] float32 | None)
    q, k [B, T, H, K]   v [B, T, H, V]   beta [B, T, H]
    g None | [B, T, H] (gated DeltaNet) | [B, T, H, K] (KDA: a decay per key), log space

Split as flash-linear-attention's chunk algorithm: everything that does not
depend on the state runs in plain JAX, batched over all chunks at once (the
WY / UT factors of Yang et al. 2024: ``A_ij = beta_i sum_d k_id k_jd exp(b_id - b_jd)``
for ``j < i``, ``X = (I + A)^{-1} [diag(beta) V, diag(beta) K exp(b)]`` =
``[U~, W]`` by a unit-lower triangular solve); the Pallas kernel (grid
``(B * H,)``, a ``fori_loop`` over chunks carrying the float32 ``[K, V]`` state)
does the sequential part. Per chunk it is the chunk of gated linear attention
(``longctx.kernels.linear_attention``) with the pseudo-values ``u`` as values::

    u  = U~ - W S
    o  = (q * exp(b)) S + A u          A_ij = sum_d q_id k_jd exp(b_id - b_jd), j <= i
    S' = exp(b_C) S + (k * exp(b_C - b))^T u

``b`` is the in-chunk cumulative log-gate (exponents ``<= 0``); hard resets
(``g = -inf``) are counted apart as in ``linear_attention``.

Backward (``jax.custom_vjp``): a second Pallas kernel walking the chunks last to
first with the state's cotangent: per chunk the linear-attention chunk backward
(``_chunk_bwd``) with ``u`` as values, then through ``u = U~ - W S``:
``dU~ = du``, ``dW = -du S^T``, ``dS += -W^T du``. Its residual is every
chunk's start state (written by the forward kernel). The WY factors are
differentiated by ordinary autodiff (plain JAX). :func:`chunk_reference` is the
kernel's recurrence in plain JAX. Verified only with ``interpret=True`` on CPU
(no GPU/TPU was available).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longctx.kernels.linear_attention import (_chunk as _gla_chunk, _chunk_bwd as _gla_chunk_bwd,
                                             bwd_walk, fwd_walk, _decays, _exp_if, _prepare, _spec,
                                             check_inputs)


def wy_factors(k, v, beta, b, r, C):
    """``U~ [N, Tp, V]`` and ``W [N, Tp, K]`` of every chunk at once (no state needed).

    ``k [N, Tp, K]``, ``v [N, Tp, V]``, ``beta [N, Tp]``, ``b, r [N, Tp, Kg]`` (Kg = 1 or K).
    """
    N, Tp, K = k.shape
    n, Kg = Tp // C, b.shape[-1]
    kc, vc = k.reshape(N, n, C, K), v.reshape(N, n, C, -1)
    bc, rc, betac = b.reshape(N, n, C, Kg), r.reshape(N, n, C, Kg), beta.reshape(N, n, C, 1)
    kb = kc * betac
    D = jax.vmap(jax.vmap(lambda b, r: _decays(b, r, C, strict=True)))(bc, rc)  # [.., C, C, Kg]
    if Kg == 1:  # scalar gate: one [C, C] decay matrix times a matmul
        A = jnp.einsum("...ik,...jk->...ij", kb, kc) * D[..., 0]
    else:  # per-key gate (KDA): the explicit [C, C, K] decays
        A = jnp.sum(kb[..., :, None, :] * kc[..., None, :, :] * D, axis=-1)  # [N, n, C, C]
    rhs = jnp.concatenate([vc * betac, kb * _exp_if(bc, rc == 0)], axis=-1)
    eye = jnp.eye(C, dtype=A.dtype)
    X = jax.scipy.linalg.solve_triangular(eye + A, rhs, lower=True, unit_diagonal=True)
    V = v.shape[-1]
    return X[..., :V].reshape(N, Tp, V), X[..., V:].reshape(N, Tp, K)


def _chunk(q, k, ut, w, b, r, S):
    """One chunk: ``q, k, w [C, K]``, ``ut [C, V]``, ``b, r [C, Kg]``, ``S [K, V]``."""
    u = ut - jnp.dot(w, S, preferred_element_type=jnp.float32)
    return _gla_chunk(q, k, u, b, r, S)


def _chunk_bwd(q, k, ut, w, b, r, S, do, dS):
    """Backward of :func:`_chunk`: ``(dq, dk, dut, dw, db, dS_prev)``."""
    f32 = jnp.float32
    u = ut - jnp.dot(w, S, preferred_element_type=f32)
    dq, dk, du, db, dS_prev = _gla_chunk_bwd(q, k, u, b, r, S, do, dS)
    dw = -jnp.dot(du, S.T, preferred_element_type=f32)
    dS_prev = dS_prev - jnp.dot(w.T, du, preferred_element_type=f32)
    return dq, dk, du, dw, db, dS_prev


def _call(kernel, ins, in_shapes, out_shapes, C, interpret):
    """One program per (batch row, head) over whole rows: ``pallas_call`` of ``kernel``."""
    N = ins[0].shape[0]
    return pl.pallas_call(
        functools.partial(kernel, C=C),
        grid=(N,),
        in_specs=[_spec(*s) for s in in_shapes],
        out_specs=[_spec(*s) for s in out_shapes],
        out_shape=[jax.ShapeDtypeStruct((N, *s), jnp.float32) for s in out_shapes],
        interpret=interpret,
    )(*ins)


def _pallas_forward(q, k, ut, w, b, r, S0, C, interpret):
    """``(o [N, Tp, V], S_T [N, K, V], chunk start states [N, n_chunks * K, V])``."""
    _, Tp, K = q.shape
    V, Kg = ut.shape[-1], b.shape[-1]
    ins = (q, k, ut, w, b, r, S0)
    in_shapes = [(Tp, K), (Tp, K), (Tp, V), (Tp, K), (Tp, Kg), (Tp, Kg), (K, V)]
    out_shapes = [(Tp, V), (K, V), (Tp // C * K, V)]
    return _call(functools.partial(fwd_walk, _chunk, 6), ins, in_shapes, out_shapes, C, interpret)


def _pallas_backward(q, k, ut, w, b, r, states, do, dS_T, C, interpret):
    """``(dq, dk, dut, dw, db, dS0)`` of :func:`_pallas_forward`."""
    _, Tp, K = q.shape
    V, Kg = ut.shape[-1], b.shape[-1]
    ins = (q, k, ut, w, b, r, states, do.astype(jnp.float32), dS_T.astype(jnp.float32))
    in_shapes = [(Tp, K), (Tp, K), (Tp, V), (Tp, K), (Tp, Kg), (Tp, Kg), (Tp // C * K, V),
                 (Tp, V), (K, V)]
    out_shapes = [(Tp, K), (Tp, K), (Tp, V), (Tp, K), (Tp, Kg), (K, V)]
    return _call(functools.partial(bwd_walk, _chunk_bwd, 6), ins, in_shapes, out_shapes, C,
                 interpret)


def chunk_reference(q, k, ut, w, b, r, S0, C):
    """The kernel's recurrence in plain JAX (same inputs and outputs as the Pallas call,
    without the chunk start states)."""
    N, Tp, _ = q.shape

    def chunks(x):
        return jnp.moveaxis(x.reshape(N, Tp // C, C, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(S, xs):
        o, S = jax.vmap(_chunk)(*xs, S)
        return S, o

    S, o = jax.lax.scan(body, S0, tuple(map(chunks, (q, k, ut, w, b, r))))
    return jnp.moveaxis(o, 0, 1).reshape(N, Tp, -1), S


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _recurrence(q, k, ut, w, b, r, S0, C, interpret):
    return tuple(_pallas_forward(q, k, ut, w, b, r, S0, C, interpret)[:2])


def _fwd(q, k, ut, w, b, r, S0, C, interpret):
    o, S, states = _pallas_forward(q, k, ut, w, b, r, S0, C, interpret)
    return (o, S), (q, k, ut, w, b, r, states)


def _bwd(C, interpret, res, cts):
    q, k, ut, w, b, r, states = res
    dq, dk, dut, dw, db, dS0 = _pallas_backward(q, k, ut, w, b, r, states, *cts, C, interpret)
    return dq, dk, dut, dw, db, jnp.zeros_like(r), dS0


_recurrence.defvjp(_fwd, _bwd)


def delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, interpret=False):
    """(Gated) delta rule / KDA, the recurrence in Pallas; see the module docstring."""
    B, T, H, K, V = check_inputs("longctx.kernels.delta_rule.delta_rule", q, k, v,
                                 initial_state=initial_state, chunk_size=chunk_size,
                                 interpret=interpret)
    if beta.shape != (B, T, H) or (g is not None and g.shape not in ((B, T, H), (B, T, H, K))):
        raise ValueError(f"beta must be [B, T, H] = {(B, T, H)} and g [B, T, H] or "
                         f"[B, T, H, K]; got {beta.shape=} g.shape="
                         f"{None if g is None else g.shape}")
    C = max(1, min(chunk_size, T))
    scale = K**-0.5 if scale is None else scale
    qr, kr, vr, b, r = _prepare(q * scale, k, v, g, C)
    Tp = qr.shape[1]
    betar = jnp.pad(jnp.moveaxis(beta.astype(jnp.float32), 2, 1).reshape(B * H, T),
                    ((0, 0), (0, Tp - T)))  # padding: beta = 0, no write
    ut, w = wy_factors(kr, vr, betar, b, r, C)
    S0 = (jnp.zeros((B * H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32).reshape(B * H, K, V))
    o, S = _recurrence(qr, kr, ut, w, b, r, S0, C, bool(interpret))
    o = jnp.moveaxis(o[:, :T].reshape(B, H, T, V), 1, 2).astype(v.dtype)
    return o, (S.reshape(B, H, K, V) if output_final_state else None)
