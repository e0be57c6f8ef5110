"""Chunked (gated) delta rule: the state recurrence as one Pallas kernel (``form="pallas"``),
with its pure-JAX reference beside it.

Same contract as ``longctx.backends.linear.ops.delta_rule``::

    delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, interpret=False)
        -> (o [B, T, H, V], final_state [B, H, K, V] float32 | None)
    q, k [B, T, H, K]   v [B, T, H, V]   beta [B, T, H]   g None | [B, T, H] (log space)

Split as flash-linear-attention's chunk algorithm: everything that does not
depend on the state runs in plain JAX, batched over all chunks at once (the
WY / UT factors of Yang et al. 2024: ``A_ij = beta_i exp(b_i - b_j) k_i.k_j``
for ``j < i``, ``X = (I + A)^{-1} [diag(beta) V, diag(beta exp(b)) K]`` =
``[U~, W]`` by a unit-lower triangular solve); the Pallas kernel (grid
``(B * H,)``, a ``fori_loop`` over chunks carrying the float32 ``[K, V]`` state)
does the sequential part, per chunk::

    U  = U~ - W S
    o  = (q * exp(b)) S + ((q k^T) * D) U          D_ij = exp(b_i - b_j), j <= i
    S' = exp(b_C) S + (k * exp(b_C - b))^T U

``b`` is the in-chunk cumulative log-gate (exponents ``<= 0``); hard resets
(``g = -inf``) are counted apart as in ``linear_attention``.

Backward: ``jax.custom_vjp`` whose backward is ``jax.vjp`` of
:func:`chunk_reference` (the kernel's recurrence in plain JAX); the WY factors
are differentiated by ordinary autodiff. Verified only with ``interpret=True``
on CPU (no GPU/TPU was available).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longctx.kernels.linear_attention import _exp_if, _prepare, check_inputs


def _decays(b, r, C, strict):
    i, j = jnp.arange(C)[:, None], jnp.arange(C)[None, :]
    ok = ((i > j) if strict else (i >= j)) & (r[..., :, None] == r[..., None, :])
    return _exp_if(b[..., :, None] - b[..., None, :], ok)


def wy_factors(k, v, beta, b, r, C):
    """``U~ [N, Tp, V]`` and ``W [N, Tp, K]`` of every chunk at once (no state needed).

    ``k [N, Tp, K]``, ``v [N, Tp, V]``, ``beta [N, Tp]``, ``b, r [N, Tp, 1]``.
    """
    N, Tp, K = k.shape
    n = Tp // C
    kc, vc = k.reshape(N, n, C, K), v.reshape(N, n, C, -1)
    bc, rc, betac = b.reshape(N, n, C), r.reshape(N, n, C), beta.reshape(N, n, C, 1)
    kb = kc * betac
    A = jnp.einsum("...ik,...jk->...ij", kb, kc) * _decays(bc, rc, C, strict=True)
    rhs = jnp.concatenate([vc * betac, kb * _exp_if(bc, rc == 0)[..., None]], axis=-1)
    eye = jnp.eye(C, dtype=A.dtype)
    X = jax.scipy.linalg.solve_triangular(eye + A, rhs, lower=True, unit_diagonal=True)
    V = v.shape[-1]
    return X[..., :V].reshape(N, Tp, V), X[..., V:].reshape(N, Tp, K)


def _chunk(q, k, ut, w, b, r, S):
    """One chunk: ``q, k, w [C, K]``, ``ut [C, V]``, ``b, r [C, 1]``, ``S [K, V]``."""
    C = q.shape[0]
    u = ut - jnp.dot(w, S, preferred_element_type=jnp.float32)
    P = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * _decays(b[:, 0], r[:, 0], C,
                                                                        strict=False)
    o = jnp.dot(q * _exp_if(b, r == 0), S, preferred_element_type=jnp.float32)
    o = o + jnp.dot(P, u, preferred_element_type=jnp.float32)
    b_last, r_last = b[C - 1:C], r[C - 1:C]
    k_out = k * _exp_if(b_last - b, r == r_last)
    S = _exp_if(b_last, r_last == 0) * S + jnp.dot(k_out.T, u, preferred_element_type=jnp.float32)
    return o, S


def _kernel(q_ref, k_ref, ut_ref, w_ref, b_ref, r_ref, s0_ref, o_ref, s_ref, *, C):
    def step(n, S):
        sl = pl.ds(pl.multiple_of(n * C, C), C)
        o, S = _chunk(q_ref[sl, :], k_ref[sl, :], ut_ref[sl, :], w_ref[sl, :], b_ref[sl, :],
                      r_ref[sl, :], S)
        o_ref[sl, :] = o.astype(o_ref.dtype)
        return S

    s_ref[...] = jax.lax.fori_loop(0, q_ref.shape[0] // C, step,
                                   s0_ref[...].astype(jnp.float32))


def _pallas_recurrence(q, k, ut, w, b, r, S0, C, interpret):
    N, Tp, K = q.shape
    V = ut.shape[-1]

    def spec(*shape):
        return pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))

    return pl.pallas_call(
        functools.partial(_kernel, C=C),
        grid=(N,),
        in_specs=[spec(Tp, K), spec(Tp, K), spec(Tp, V), spec(Tp, K), spec(Tp, 1),
                  spec(Tp, 1), spec(K, V)],
        out_specs=[spec(Tp, V), spec(K, V)],
        out_shape=[jax.ShapeDtypeStruct((N, Tp, V), jnp.float32),
                   jax.ShapeDtypeStruct((N, K, V), jnp.float32)],
        interpret=interpret,
    )(q, k, ut, w, b, r, S0)


def chunk_reference(q, k, ut, w, b, r, S0, C):
    """The kernel's recurrence in plain JAX (same inputs and outputs as the Pallas call)."""
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
    return _pallas_recurrence(q, k, ut, w, b, r, S0, C, interpret)


def _fwd(q, k, ut, w, b, r, S0, C, interpret):
    return _pallas_recurrence(q, k, ut, w, b, r, S0, C, interpret), (q, k, ut, w, b, r, S0)


def _bwd(C, interpret, res, cts):
    q, k, ut, w, b, r, S0 = res
    _, vjp = jax.vjp(lambda q, k, ut, w, b, S0: chunk_reference(q, k, ut, w, b, r, S0, C),
                     q, k, ut, w, b, S0)
    dq, dk, dut, dw, db, dS0 = vjp(cts)
    return dq, dk, dut, dw, db, jnp.zeros_like(r), dS0


_recurrence.defvjp(_fwd, _bwd)


def delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, interpret=False):
    """(Gated) delta rule, the recurrence in Pallas; see the module docstring."""
    B, T, H, K, V = check_inputs("longctx.kernels.delta_rule.delta_rule", q, k, v,
                                 initial_state=initial_state, chunk_size=chunk_size,
                                 interpret=interpret)
    if beta.shape != (B, T, H) or (g is not None and g.shape != (B, T, H)):
        raise ValueError(f"beta and g must be [B, T, H] = {(B, T, H)}; got {beta.shape=} "
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
