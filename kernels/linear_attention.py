"""Chunked (gated) linear attention as one Pallas kernel (``form="pallas"``), with its
pure-JAX reference beside it.

Same contract as ``longctx.backends.linear.ops.linear_attention`` (``normalize``
aside)::

    linear_attention(q, k, v, *, g=None, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64, interpret=False)
        -> (o [B, T, H, V], final_state [B, H, K, V] float32 | None)
    q, k [B, T, H, K]   v [B, T, H, V]   g None | [B, T, H] | [B, T, H, K] (log space)

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t        o_t = (scale q_t) S_t

Kernel (one program per (batch row, head); grid ``(B * H,)``; the BlockSpecs hand
each program its whole ``[T, K]`` / ``[T, V]`` rows, as JAX's Pallas GPU flash
attention does, and a ``fori_loop`` walks the chunks carrying the float32
``[K, V]`` state in registers / VMEM). Per chunk of ``C`` tokens, with ``b`` the
cumulative log-gate *from the chunk start* (every exponent below is ``<= 0``) and
``r`` the number of hard resets (``g = -inf``) so far in the chunk::

    A_ij = sum_d q_id k_jd exp(b_id - b_jd)    (j <= i, r_i == r_j; else 0)
    o    = A v + (q * exp(b) [r == 0]) S
    S'   = exp(b_C) [r_C == 0] * S + (k * exp(b_C - b) [r == r_C])^T v

A scalar gate (``g [B, T, H]``, or none) makes ``A`` one ``[C, C]`` matmul times a
decay matrix; a per-key gate (GLA) forms the ``[C, C, K]`` decays explicitly
(elementwise work ``C^2 K`` per chunk, not on the matrix units; use a small
``chunk_size``, e.g. 16). ``b`` and ``r`` are computed outside the kernel (an
elementwise cumsum over each chunk), so the kernel itself has no scan.

Backward (``jax.custom_vjp``): a second Pallas kernel, same grid, walking the
chunks last to first and carrying the state's cotangent ``dS [K, V]``: per chunk
the hand-derived gradients of :func:`_chunk_bwd` (for a scalar gate or none eight
``C``-sized matmuls, the gate's gradient from the row and column sums of
``dA * A`` and the boundary decays; for per-key gates the same sums over the
explicit ``[C, C, K]`` decays). Its residual is every chunk's start state,
written by the forward kernel (``K V / C`` floats per token and head, linear in
``T``). :func:`chunk_reference` is the same chunk math in plain JAX (a
``lax.scan`` over chunks, each chunk one ``jax.checkpoint``): the reference the
tests and the delta-rule kernel's docs point to.

Hardware: written for both Pallas backends (GPU Triton, TPU Mosaic), verified
only with ``interpret=True`` on CPU (no GPU/TPU was available): whether the
``[C, C, K]`` per-key path lowers on Triton / Mosaic is untested. On a backend
other than GPU/TPU without ``interpret`` the call raises, naming the backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longctx import targets


def available() -> bool:
    """Can the compiled (non-interpreted) kernel run on the target (the devices being
    compiled for, :func:`longctx.targets.platform`)?"""
    return targets.platform() in ("gpu", "tpu")


def check_inputs(fn: str, q, k, v, *, initial_state, chunk_size, interpret: bool):
    """The checks both linear kernels share (``fn``: the function's qualified name).

    Raises ``ValueError`` off GPU/TPU without ``interpret``, and for layouts other than
    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``initial_state [B, H, K, V]`` or a
    ``chunk_size`` that is not a positive int. Returns ``(B, T, H, K, V)``.
    """
    if not interpret and not available():
        raise ValueError(
            f"form='pallas' runs a Pallas GPU/TPU kernel; the target platform is "
            f"{targets.platform()!r}. Use form='chunk', or {fn}(..., interpret=True)")
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expects q, k [B, T, H, K] and v [B, T, H, V]; got "
                         f"{q.shape=} {k.shape=} {v.shape=}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}; got "
                         f"{initial_state.shape=}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be a positive int")
    return B, T, H, K, V


# ----------------------------------------------------------------------------
# Preparation (outside the kernel): layout, padding, in-chunk cumulative gates.
# ----------------------------------------------------------------------------


def _prepare(q, k, v, g, C):
    """[B, T, H, ...] -> [B*H, Tp, ...] float32; gates -> (b, r) [B*H, Tp, Kg] per chunk."""
    B, T, H, K = q.shape
    Tp = -(-T // C) * C

    def rows(x):
        x = jnp.moveaxis(x.astype(jnp.float32), 2, 1).reshape(B * H, T, *x.shape[3:])
        return jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))

    if g is None:
        g = jnp.zeros((B, T, H, 1), jnp.float32)
    elif g.ndim == 3:
        g = g[..., None]
    g = rows(g).reshape(B * H, Tp // C, C, g.shape[-1])  # padding: g = 0, no change
    reset = jnp.isneginf(g)
    b = jnp.cumsum(jnp.where(reset, 0.0, g), axis=2).reshape(B * H, Tp, -1)
    r = jnp.cumsum(reset.astype(jnp.float32), axis=2).reshape(B * H, Tp, -1)
    return rows(q), rows(k), rows(v), b, r


def _exp_if(x, ok):
    return jnp.exp(jnp.where(ok, x, -jnp.inf))  # masked before the exp: never overflows


def _decays(b, r, C, strict=False):
    """The in-chunk decays ``D_ijd = exp(b_id - b_jd) [j <= i (j < i if strict), r_id == r_jd]``
    ``[C, C, Kg]`` from ``b, r [C, Kg]`` (masked before the exp: never overflows)."""
    i, j = jnp.arange(C)[:, None, None], jnp.arange(C)[None, :, None]
    ok = ((i > j) if strict else (i >= j)) & (r[:, None, :] == r[None, :, :])
    return _exp_if(b[:, None, :] - b[None, :, :], ok)


def _chunk(q, k, v, b, r, S):
    """One chunk: ``q, k [C, K]``, ``v [C, V]``, ``b, r [C, Kg]``, ``S [K, V]`` -> (o, S')."""
    C = q.shape[0]
    D = _decays(b, r, C)  # [C, C, Kg]
    if b.shape[-1] == 1:  # scalar gate: [C, C] decay matrix times one matmul
        A = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * D[:, :, 0]
    else:  # per-key gate: explicit [C, C, K] decays
        A = jnp.sum(q[:, None, :] * k[None, :, :] * D, axis=-1)
    b_last, r_last = b[C - 1:C], r[C - 1:C]  # [1, Kg]
    o = jnp.dot(A, v, preferred_element_type=jnp.float32)
    o = o + jnp.dot(q * _exp_if(b, r == 0), S, preferred_element_type=jnp.float32)
    k_out = k * _exp_if(b_last - b, r == r_last)
    across = _exp_if(b_last, r_last == 0).reshape(-1, 1)  # [Kg, 1]: S rows decay
    S = across * S + jnp.dot(k_out.T, v, preferred_element_type=jnp.float32)
    return o, S


# ----------------------------------------------------------------------------
# The Pallas kernel and the pure-JAX reference of the same math.
# ----------------------------------------------------------------------------


def fwd_walk(chunk, n_in, *refs, C):
    """A forward kernel body: the chunks of one (batch row, head), first to last, carrying
    the float32 ``[K, V]`` state.

    ``refs``: ``n_in`` per-token inputs ``[Tp, .]``, ``S_0 [K, V]``, then the outputs
    ``o [Tp, V]``, ``S_T [K, V]`` and optionally every chunk's start state
    ``[n_chunks * K, V]`` (the backward's residual). ``chunk(*inputs, S) -> (o, S')``.
    """
    ins, s0_ref, o_ref, s_ref, states_ref = (refs[:n_in], refs[n_in], refs[n_in + 1],
                                             refs[n_in + 2], refs[n_in + 3:])
    n_chunks, K = ins[0].shape[0] // C, s0_ref.shape[0]

    def step(n, S):
        sl = pl.ds(pl.multiple_of(n * C, C), C)
        if states_ref:
            states_ref[0][pl.ds(pl.multiple_of(n * K, K), K), :] = S
        o, S = chunk(*(x[sl, :] for x in ins), S)
        o_ref[sl, :] = o.astype(o_ref.dtype)
        return S

    s_ref[...] = jax.lax.fori_loop(0, n_chunks, step, s0_ref[...].astype(jnp.float32))


def _spec(*shape):
    """One program's whole block ``shape`` of an array ``[N, *shape]``."""
    return pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))


def _pallas_forward(q, k, v, b, r, S0, C, interpret, with_states=False):
    """``q, k [N, Tp, K]``, ``v [N, Tp, V]``, ``b, r [N, Tp, Kg]``, ``S0 [N, K, V]``.

    Returns ``(o, S_T)``, and with ``with_states`` also every chunk's start state
    ``[N, n_chunks * K, V]`` (``K V / C`` floats per token: the backward's residual)."""
    N, Tp, K = q.shape
    V, Kg = v.shape[-1], b.shape[-1]
    n_chunks = Tp // C
    out_specs = [_spec(Tp, V), _spec(K, V)]
    out_shape = [jax.ShapeDtypeStruct((N, Tp, V), jnp.float32),
                 jax.ShapeDtypeStruct((N, K, V), jnp.float32)]
    if with_states:
        out_specs.append(_spec(n_chunks * K, V))
        out_shape.append(jax.ShapeDtypeStruct((N, n_chunks * K, V), jnp.float32))
    return pl.pallas_call(
        functools.partial(fwd_walk, _chunk, 5, C=C),
        grid=(N,),
        in_specs=[_spec(Tp, K), _spec(Tp, K), _spec(Tp, V), _spec(Tp, Kg), _spec(Tp, Kg),
                  _spec(K, V)],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
    )(q, k, v, b, r, S0)


def _chunk_bwd(q, k, v, b, r, S, do, dS):
    """Backward of :func:`_chunk`, by hand, for a scalar (``b, r [C, 1]``) or per-key
    (``[C, K]``) gate.

    With ``D_ijd = exp(b_id - b_jd) [j <= i, r_id == r_jd]``, ``A_ij = sum_d q_id k_jd D_ijd``,
    ``e = exp(b) [r == 0]``, ``f = exp(b_C - b) [r == r_C]``, ``a = exp(b_C) [r_C == 0]``
    (so ``o = A v + (q e) S``, ``S' = a S + (k f)^T v``, ``a`` scaling the rows of ``S``)
    and the cotangents ``do [C, V]``, ``dS [K, V]`` of ``o`` and ``S'``::

        dv = A^T do + (k f) dS;   dA = do v^T
        dq_id = sum_j dA_ij k_jd D_ijd + e_id (do S^T)_id
        dk_jd = sum_i dA_ij q_id D_ijd + f_jd (v dS^T)_jd
        dS_prev = (q e)^T do + a dS
        Z_ijd = dA_ij q_id k_jd D_ijd
        db_id = sum_j Z_ijd - sum_j Z_jid + (q e)_id (do S^T)_id - (k f)_id (v dS^T)_id
        db_Cd += sum_j (k f)_jd (v dS^T)_jd + a_d sum_v dS_dv S_dv

    (each exponent ``b_i - b_j`` moves with ``b_i`` and against ``b_j``; for a scalar
    gate every ``d`` sum runs over the keys and ``D`` is one ``[C, C]`` matrix, so
    ``dA * D`` and ``Z = dA * A`` are matmul-sized). Returns
    ``(dq, dk, dv, db [C, Kg], dS_prev)``.
    """
    C, K = q.shape
    Kg = b.shape[-1]
    f32 = jnp.float32
    D = _decays(b, r, C)  # [C, C, Kg]
    e = _exp_if(b, r == 0)  # [C, Kg]
    f = _exp_if(b[C - 1:C] - b, r == r[C - 1:C])  # [C, Kg]
    a = _exp_if(b[C - 1:C], r[C - 1:C] == 0)  # [1, Kg]
    qe, kf = q * e, k * f
    dA = jnp.dot(do, v.T, preferred_element_type=f32)
    dqe = jnp.dot(do, S.T, preferred_element_type=f32)  # [C, K]
    dkf = jnp.dot(v, dS.T, preferred_element_type=f32)  # [C, K]
    if Kg == 1:  # scalar gate: [C, C] matrices and matmuls
        D = D[:, :, 0]
        A = jnp.dot(q, k.T, preferred_element_type=f32) * D
        dP = dA * D
        dq = jnp.dot(dP, k, preferred_element_type=f32)
        dk = jnp.dot(dP.T, q, preferred_element_type=f32)
        Z = dA * A
        dZ = jnp.sum(Z, axis=1, keepdims=True) - jnp.sum(Z.T, axis=1, keepdims=True)
    else:  # per-key gate: the explicit [C, C, K] decays, as in the forward
        A = jnp.sum(q[:, None, :] * k[None, :, :] * D, axis=-1)
        dPD = dA[:, :, None] * D
        dq = jnp.sum(dPD * k[None, :, :], axis=1)
        dk = jnp.sum(dPD * q[:, None, :], axis=0)
        Z = dPD * q[:, None, :] * k[None, :, :]
        dZ = jnp.sum(Z, axis=1) - jnp.sum(Z, axis=0)
    dq = dq + dqe * e
    dk = dk + dkf * f
    dv = jnp.dot(A.T, do, preferred_element_type=f32) + jnp.dot(kf, dS, preferred_element_type=f32)
    dF = kf * dkf  # [C, K]
    dE = qe * dqe
    if Kg == 1:
        dF, dE = jnp.sum(dF, axis=1, keepdims=True), jnp.sum(dE, axis=1, keepdims=True)
    db = dZ + dE - dF
    dSS = jnp.sum(dS * S, axis=1)[None, :]  # [1, K]: per row of S
    if Kg == 1:
        dSS = jnp.sum(dSS, axis=1, keepdims=True)
    last = jnp.sum(dF, axis=0, keepdims=True) + a * dSS  # [1, Kg]
    row = jnp.arange(C)[:, None]
    db = db + jnp.where(row == C - 1, last, 0.0)
    dS_prev = jnp.dot(qe.T, do, preferred_element_type=f32) + a.reshape(-1, 1) * dS
    return dq, dk, dv, db, dS_prev


def bwd_walk(chunk_bwd, n_in, *refs, C):
    """A backward kernel body: the chunks of one (batch row, head), last chunk first,
    carrying the state's cotangent ``[K, V]``.

    ``refs``: ``n_in`` per-token inputs ``[Tp, .]`` (the last one, the reset counts ``r``,
    gets no gradient), the chunk start states ``[n_chunks * K, V]`` written by the
    forward kernel, ``do [Tp, V]``, ``dS_T [K, V]``; then the ``n_in - 1`` per-token
    gradients and ``dS_0``. ``chunk_bwd(*inputs, S, do, dS) -> (*grads, dS_prev)``.
    """
    ins, (st_ref, do_ref, dsT_ref) = refs[:n_in], refs[n_in:n_in + 3]
    grads, ds0_ref = refs[n_in + 3:-1], refs[-1]
    n_chunks, K = ins[0].shape[0] // C, ins[0].shape[1]

    def step(i, dS):
        n = n_chunks - 1 - i
        sl = pl.ds(pl.multiple_of(n * C, C), C)
        S = st_ref[pl.ds(pl.multiple_of(n * K, K), K), :]
        *gs, dS = chunk_bwd(*(x[sl, :] for x in ins), S, do_ref[sl, :], dS)
        for ref, x in zip(grads, gs):
            ref[sl, :] = x
        return dS

    ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, step, dsT_ref[...].astype(jnp.float32))


def _pallas_backward(q, k, v, b, r, states, do, dS_T, C, interpret):
    """Gradients of :func:`_pallas_forward`: ``(dq, dk, dv, db, dS0)``."""
    N, Tp, K = q.shape
    V, Kg = v.shape[-1], b.shape[-1]
    n_chunks = Tp // C
    shapes = [(Tp, K), (Tp, K), (Tp, V), (Tp, Kg), (K, V)]
    return pl.pallas_call(
        functools.partial(bwd_walk, _chunk_bwd, 5, C=C),
        grid=(N,),
        in_specs=[_spec(Tp, K), _spec(Tp, K), _spec(Tp, V), _spec(Tp, Kg), _spec(Tp, Kg),
                  _spec(n_chunks * K, V), _spec(Tp, V), _spec(K, V)],
        out_specs=[_spec(*s) for s in shapes],
        out_shape=[jax.ShapeDtypeStruct((N, *s), jnp.float32) for s in shapes],
        interpret=interpret,
    )(q, k, v, b, r, states, do.astype(jnp.float32), dS_T.astype(jnp.float32))


def chunk_reference(q, k, v, b, r, S0, C):
    """The kernel's math in plain JAX (same inputs and outputs as the Pallas call)."""
    N, Tp, K = q.shape

    def chunks(x):  # [N, Tp, ...] -> [n, N, C, ...]
        return jnp.moveaxis(x.reshape(N, Tp // C, C, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # the backward keeps only the state at each chunk start
    def body(S, xs):
        o, S = jax.vmap(_chunk)(*xs, S)
        return S, o

    S, o = jax.lax.scan(body, S0, tuple(map(chunks, (q, k, v, b, r))))
    return jnp.moveaxis(o, 0, 1).reshape(N, Tp, -1), S


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _gla(q, k, v, b, r, S0, C, interpret):
    return _pallas_forward(q, k, v, b, r, S0, C, interpret)


def _gla_fwd(q, k, v, b, r, S0, C, interpret):
    o, S, states = _pallas_forward(q, k, v, b, r, S0, C, interpret, with_states=True)
    return (o, S), (q, k, v, b, r, states)


def _gla_bwd(C, interpret, res, cts):
    q, k, v, b, r, states = res
    dq, dk, dv, db, dS0 = _pallas_backward(q, k, v, b, r, states, *cts, C, interpret)
    return dq, dk, dv, db, jnp.zeros_like(r), dS0


_gla.defvjp(_gla_fwd, _gla_bwd)


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64, interpret=False):
    """(Gated) linear attention by the Pallas chunk kernel; see the module docstring."""
    B, T, H, K, V = check_inputs("longctx.kernels.linear_attention.linear_attention", q, k, v,
                                 initial_state=initial_state, chunk_size=chunk_size,
                                 interpret=interpret)
    if g is not None and g.shape not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"g must be [B, T, H] or [B, T, H, K]; got {g.shape=}")
    C = max(1, min(chunk_size, T))
    scale = K**-0.5 if scale is None else scale
    qr, kr, vr, b, r = _prepare(q * scale, k, v, g, C)
    S0 = (jnp.zeros((B * H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32).reshape(B * H, K, V))
    o, S = _gla(qr, kr, vr, b, r, S0, C, bool(interpret))
    o = jnp.moveaxis(o[:, :T].reshape(B, H, T, V), 1, 2).astype(v.dtype)
    return o, (S.reshape(B, H, K, V) if output_final_state else None)
