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
``[U~, W]`` by a unit-lower triangular solve); the Pallas kernel
does the sequential part on the chunk grid of :mod:`longctx.kernels.chunk_grid`
(batch x heads parallel, chunks sequential, the state in VMEM scratch, one chunk's
blocks on chip: VMEM independent of ``T``). Per chunk it is the chunk of gated linear attention
(``longctx.kernels.linear_attention``) with the pseudo-values ``u`` as values::

    u  = U~ - W S
    o  = (q * exp(b)) S + A u          A_ij = sum_d q_id k_jd exp(b_id - b_jd), j <= i
    S' = exp(b_C) S + (k * exp(b_C - b))^T u

``b`` is the in-chunk cumulative log-gate (exponents ``<= 0``); hard resets
(``g = -inf``) are counted apart as in ``linear_attention``.

Backward (``jax.custom_vjp``): a second Pallas kernel walking the chunks last to
first with the state's cotangent: per chunk the linear-attention chunk backward
(``_chunk_bwd``) with ``u`` as values, then through ``u = U~ - W S``:
``dU~ = du``, ``dW = -du S^T``, ``dS += -W^T du``. Its residual is the start state of
every ``M``-th chunk (written by the forward kernel; the backward recomputes the others
on chip, as in ``linear_attention``). The WY factors are differentiated by ordinary
autodiff (plain JAX); the per-key (KDA) scores are rematerialised in the backward
(``jax.checkpoint``) rather than saved, so their ``[C, C, K]`` decays per chunk
(``C`` times the keys' size) never reach HBM. :func:`chunk_reference` is the
kernel's recurrence in plain JAX. The chunk math is walked by Mosaic on TPU and by
Triton on GPU (``backend=``, as in ``linear_attention``); runs anywhere with
``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longctx.kernels.chunk_grid import dot, dot_nt, dot_tn
from longctx.kernels.linear_attention import (advance, chunk_bwd as _gla_chunk_bwd,
                                             chunk_fwd as _gla_chunk, exp_if, gate_cols,
                                             gate_grad_shape, grad_shapes, group_of,
                                             prepare_chunks, check_inputs, chunk_of,
                                             over_slabs, pack_gates, slab_of, start_state,
                                             temporaries, walker_of)


def _decays(b, r, C):
    """``exp(b_i - b_j) [j < i, r_i == r_j]`` ``[C, C, Kg]`` from ``b, r [C, Kg]``."""
    i, j = jnp.arange(C)[:, None, None], jnp.arange(C)[None, :, None]
    ok = (i > j) & (r[:, None, :] == r[None, :, :])
    return exp_if(b[:, None, :] - b[None, :, :], ok)


@functools.partial(jax.checkpoint, static_argnums=(4,))  # residuals: the inputs, not [C, C, K]
def _scores(kb, kc, bc, rc, C):
    """``A_ij = sum_d kb_id kc_jd exp(b_id - b_jd)`` (``j < i``, same reset) ``[N, n, C, C]``."""
    D = jax.vmap(jax.vmap(lambda b, r: _decays(b, r, C)))(bc, rc)  # [.., C, C, Kg]
    if bc.shape[-1] == 1:  # scalar gate: one [C, C] decay matrix times a matmul
        return jnp.einsum("...ik,...jk->...ij", kb, kc) * D[..., 0]
    # per-key gate (KDA): the [C, C, K] decays, summed over keys in one fusion
    return jnp.sum(kb[..., :, None, :] * kc[..., None, :, :] * D, axis=-1)


def wy_factors(k, v, beta, b, r, C):
    """``U~ [N, Tp, V]`` and ``W [N, Tp, K]`` of every chunk at once (no state needed).

    ``k [N, Tp, K]``, ``v [N, Tp, V]``, ``beta [N, Tp]``, ``b, r [N, Tp, Kg]`` (Kg = 1 or K).
    """
    N, Tp, K = k.shape
    n, Kg = Tp // C, b.shape[-1]
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    kc, vc = k.reshape(N, n, C, K), v.reshape(N, n, C, -1)
    bc, rc, betac = b.reshape(N, n, C, Kg), r.reshape(N, n, C, Kg), beta.reshape(N, n, C, 1)
    kb = kc * betac
    A = _scores(kb, kc, bc, rc, C)
    # two solves with one matrix, not one of the concatenated [U~, W] right-hand side: the
    # solve is column by column, so the values are the same, and no [.., C, V + K] copy (nor
    # its slices, nor their cotangents' concatenation) is made: 2 float32 [T, K]-sized
    # arrays less in HBM, each 8 GiB at 1M tokens, 8 heads, head_dim 256
    L = jnp.eye(C, dtype=A.dtype) + A
    ut, w = (jax.scipy.linalg.solve_triangular(L, rhs, lower=True, unit_diagonal=True)
             for rhs in (vc * betac, kb * exp_if(bc, rc == 0)))
    return ut.reshape(N, Tp, -1), w.reshape(N, Tp, K)


def _chunk(q, k, ut, w, *gates_and_S):
    """One chunk: ``q, k, w [C, K]``, ``ut [C, V]``, gates (packed ``[2, C]`` or
    ``b, r [C, K]``), ``S [K, V]`` -> ``(o [C, V], S')``."""
    *gates, S = gates_and_S
    return _gla_chunk(q, k, ut - dot(w, S), *gates, S)


def _chunk_state(q, k, ut, w, *gates_and_S):
    """The state update of :func:`_chunk` alone (the backward's recompute): ``S'``."""
    *gates, S = gates_and_S
    return advance(k, ut - dot(w, S), *gate_cols(gates), S)


def _chunk_bwd(q, k, ut, w, *rest):
    """Backward of :func:`_chunk`: ``(dq, dk, dut, dw, dgate, dS_prev)``."""
    *gates, S, do, dS = rest
    u = ut - dot(w, S)
    dq, dk, du, dg, dS_prev = _gla_chunk_bwd(q, k, u, *gates, S, do, dS)
    dw = -dot_nt(du, S)
    dS_prev = dS_prev - dot_tn(w, du)
    return dq, dk, du, dw, dg, dS_prev


def _temps(q, ut, gates, C):
    K, V = q.shape[-1], ut.shape[-1]
    return temporaries(C, K, V, 1 if len(gates) == 1 else K) + [(C, V)] * 2 + [(C, K)] * 2


def chunk_reference(q, k, ut, w, gates, S0, C):
    """The kernel's recurrence in plain JAX (same inputs and outputs as
    :func:`_recurrence`)."""
    N, Tp, _ = q.shape

    def chunks(x):
        x = x.reshape(N, Tp // C, C, *x.shape[2:]) if x.ndim == 3 else x
        return jnp.moveaxis(x.astype(jnp.float32), 1, 0)

    @jax.checkpoint
    def body(S, xs):
        o, S = jax.vmap(_chunk)(*xs, S)
        return S, o

    S, o = jax.lax.scan(body, S0, tuple(map(chunks, (q, k, ut, w, *gates))))
    return jnp.moveaxis(o, 0, 1).reshape(N, Tp, -1), S


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _recurrence(q, k, ut, w, gates, S0, C, M, out_dtype, walk, interpret):
    return tuple(walk.forward(_chunk, (q, k, ut, w, *gates), S0, C, interpret=interpret,
                              out_dtype=out_dtype, temporaries=_temps(q, ut, gates, C)))


def _fwd(q, k, ut, w, gates, S0, C, M, out_dtype, walk, interpret):
    o, S, states = walk.forward(_chunk, (q, k, ut, w, *gates), S0, C, interpret=interpret,
                                out_dtype=out_dtype, group=M,
                                temporaries=_temps(q, ut, gates, C))
    return (o, S), (q, k, ut, w, gates, states)


def _bwd(C, M, out_dtype, walk, interpret, res, cts):
    q, k, ut, w, gates, states = res
    N, Tp, _ = q.shape
    shapes = (*grad_shapes(q, k, ut, w), gate_grad_shape(gates, N, Tp))
    dq, dk, dut, dw, dg, dS0 = walk.backward(_chunk_state, _chunk_bwd, (q, k, ut, w, *gates),
                                             shapes, states, *cts, C, group=M,
                                             interpret=interpret,
                                             temporaries=_temps(q, ut, gates, C))
    if len(gates) == 1:  # packed [N, n, 2, C]: b gets dg, r none
        dgates = (jnp.concatenate([dg, jnp.zeros_like(dg)], axis=2),)
    else:
        dgates = (dg, jnp.zeros_like(gates[1]))
    return dq, dk, dut, dw, dgates, dS0


_recurrence.defvjp(_fwd, _bwd)


def delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, interpret=False, group=None,
               backend=None, slab=None):
    """(Gated) delta rule / KDA, the recurrence in Pallas; see the module docstring.
    ``group``, ``backend``, ``slab``: as in ``linear_attention.linear_attention``."""
    fn = "longctx.kernels.delta_rule.delta_rule"
    B, T, H, K, V = check_inputs(fn, q, k, v, initial_state=initial_state,
                                 chunk_size=chunk_size, interpret=interpret)
    walk = walker_of(fn, backend, interpret)
    if beta.shape != (B, T, H) or (g is not None and g.shape not in ((B, T, H), (B, T, H, K))):
        raise ValueError(f"beta must be [B, T, H] = {(B, T, H)} and g [B, T, H] or "
                         f"[B, T, H, K]; got {beta.shape=} g.shape="
                         f"{None if g is None else g.shape}")
    C = chunk_of(walk, chunk_size, T, K, V, interpret, q.dtype)
    L = slab_of(slab, B, T, H, K, V, C)
    if L < T:
        def run(xs, S):
            return delta_rule(*xs[:3], xs[3], g=xs[4], scale=scale, initial_state=S,
                              output_final_state=True, chunk_size=chunk_size,
                              interpret=interpret, group=group, backend=backend, slab=0)

        o, S = over_slabs(run, (q, k, v, beta, g), start_state(initial_state, B, H, K, V), L)
        return o, (S if output_final_state else None)
    scale = K**-0.5 if scale is None else scale
    qr, kr, vr, b, r = prepare_chunks(q * scale, k, v, g, C)
    Tp = qr.shape[1]
    betar = jnp.pad(jnp.moveaxis(beta.astype(jnp.float32), 2, 1).reshape(B * H, T),
                    ((0, 0), (0, Tp - T)))  # padding: beta = 0, no write
    ut, w = wy_factors(kr, vr, betar, b, r, C)
    S0 = start_state(initial_state, B, H, K, V).reshape(B * H, K, V)
    M = group_of(walk, K, V, C, q.dtype, Tp // C, group)
    o, S = _recurrence(qr, kr, ut, w, pack_gates(b, r, C), S0, C, M, v.dtype, walk,
                       bool(interpret))
    o = jnp.moveaxis(o[:, :T].reshape(B, H, T, V), 1, 2).astype(v.dtype)
    return o, (S.reshape(B, H, K, V) if output_final_state else None)
