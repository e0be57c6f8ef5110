"""Chunked (gated) linear attention as Pallas kernels (``form="pallas"``), with its pure-JAX
reference beside it.

Same contract as ``longctx.backends.linear.ops.linear_attention`` (``normalize``
aside)::

    linear_attention(q, k, v, *, g=None, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64, interpret=False)
        -> (o [B, T, H, V], final_state [B, H, K, V] float32 | None)
    q, k [B, T, H, K]   v [B, T, H, V]   g None | [B, T, H] | [B, T, H, K] (log space)

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t        o_t = (scale q_t) S_t

Kernel: the chunk grid of :mod:`longctx.kernels.chunk_grid` (batch x heads parallel,
chunks sequential, the float32 ``[K, V]`` state in VMEM scratch, one ``(C, K)`` /
``(C, V)`` block per input and step; VMEM independent of ``T``). Per chunk of ``C``
tokens, with ``b`` the cumulative log-gate *from the chunk start* (every exponent
below is ``<= 0``) and ``r`` the number of hard resets (``g = -inf``) so far in the
chunk::

    A_ij = sum_d q_id k_jd exp(b_id - b_jd)    (j <= i, r_i == r_j; else 0)
    o    = A v + (q * exp(b) [r == 0]) S
    S'   = exp(b_C) [r_C == 0] * S + (k * exp(b_C - b) [r == r_C])^T v

A scalar gate (``g [B, T, H]``, or none) makes ``A`` one ``[C, C]`` matmul times a
decay matrix, and its ``b, r`` travel packed ``[N, n_chunks, 2, C]`` (lane-dense); a
per-key gate (GLA) forms the ``[C, C, K]`` decays explicitly (elementwise work
``C^2 K`` per chunk, not on the matrix units; use a small ``chunk_size``, e.g. 16) from
``b, r`` blocks ``(C, K)``. ``b`` and ``r`` are computed outside the kernel (an
elementwise cumsum over each chunk), so the kernel itself has no scan.

Backward (``jax.custom_vjp``): a second kernel walking the chunks last to first,
carrying the state's cotangent ``dS [K, V]`` in scratch: per chunk the hand-derived
gradients of :func:`chunk_bwd`. Its residual is the start state of every ``M``-th chunk
(``chunk_grid.group_of``: ``K V / (C M)`` floats per token and head in HBM), from which
it recomputes a group's ``M`` chunk start states on chip (:func:`chunk_state`) before
walking the group backwards. q, k, v travel in their own dtype (bfloat16 stays
bfloat16 in HBM) and are cast to float32 on chip. :func:`chunk_reference` is the same
chunk math in plain JAX (a ``lax.scan`` over chunks).

Long sequences run in slabs (:func:`over_slabs`): past ``slab`` tokens (default
:func:`slab_of`: 64 MiB per float32 ``[B*H, slab, max(K, V, 128)]`` array) a scan over slabs
carries the state, and its backward recomputes a slab's forward before the slab's
backward, so the XLA-side work around the kernels (layout copies, gate cumsums, the delta
rule's WY factors, the GPU walker's partial sums) is a slab's worth, not the sequence's.

Hardware: one chunk math, two walkers: the TPU grid of :mod:`longctx.kernels.chunk_grid`
(Mosaic) and the GPU loop of :mod:`longctx.kernels.chunk_triton` (Triton), picked by the
target platform (``backend=``); both run anywhere with ``interpret=True``
(``experiments.bench_kernels --target v5p-8|h100 --compile-only`` compiles them).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from longctx import targets
from longctx.kernels import chunk_grid as grid
from longctx.kernels import chunk_triton
from longctx.kernels.chunk_grid import dot, dot_nt, dot_tn, iota, pick_row, to_col, to_row


def available() -> bool:
    """Can the compiled (non-interpreted) kernel run on the target (the devices being
    compiled for, :func:`longctx.targets.platform`)?"""
    return targets.platform() in ("gpu", "tpu")


# The two walkers of the one chunk math: Mosaic (TPU) and Triton (GPU).
WALKERS = {"mosaic": grid, "triton": chunk_triton}
_NATIVE = {"tpu": "mosaic", "gpu": "triton"}


def walker_of(fn: str, backend, interpret: bool):
    """The walker module for ``backend`` (``"mosaic"``, ``"triton"``, or None: the target
    platform's). Compiled (not ``interpret``), the backend must be the platform's own."""
    platform = targets.platform()
    if backend is None:
        backend = _NATIVE.get(platform, "mosaic")
    if backend not in WALKERS:
        raise ValueError(f"{fn}: {backend=} must be one of {sorted(WALKERS)} or None")
    if not interpret and _NATIVE.get(platform) != backend:
        raise ValueError(f"{fn}: {backend=} compiles for {'TPU' if backend == 'mosaic' else 'GPU'};"
                         f" the target platform is {platform!r}. Use backend=None (the "
                         f"platform's), or interpret=True")
    return WALKERS[backend]


def group_of(walker, K: int, V: int, C: int, dtype, n_chunks: int, group) -> int:
    """Chunks per saved state: ``group`` (a positive int) or ``chunk_grid.group_of`` within
    the walker's cap (Mosaic: its VMEM scratch; Triton: ``chunk_triton.GROUP_MAX``)."""
    if group is None:
        cap = chunk_triton.GROUP_MAX if walker is chunk_triton else None
        return grid.group_of(K, V, C, jnp.dtype(dtype).itemsize, n_chunks, cap)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"{group=} must be a positive int (chunks per saved state) or None")
    return group


def start_state(initial_state, B, H, K, V):
    """The float32 start state ``[B, H, K, V]`` (zeros for None)."""
    return (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))


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


def chunk_of(walker, chunk_size: int, T: int, K: int, V: int, interpret: bool,
             dtype=jnp.float32) -> int:
    """The chunk the kernels run: ``chunk_size``, or ``T`` rounded up when shorter (Mosaic:
    to the row tile, 8 rows of float32, 16 of bfloat16; Triton: to a power of two >= 16),
    checked against the walker's block rules unless ``interpret``."""
    if walker is chunk_triton:
        C = chunk_triton.chunk_of(chunk_size, T)
        if not interpret:
            chunk_triton.check_shapes(C, K, V, T, chunk_size)
        return C
    rows = 8 * 4 // jnp.dtype(dtype).itemsize
    C = max(1, min(chunk_size, -(-T // rows) * rows))
    if not interpret:
        grid.check_chunk(C, T, chunk_size, dtype)
    return C


# ----------------------------------------------------------------------------
# Slabs: the XLA-side work of a long sequence, a slab at a time.
# ----------------------------------------------------------------------------

# Bytes of one float32 [B*H, slab, max(K, V, 128)] array: the slab length's budget (64 MiB;
# 16K tokens at 8 heads of head_dim 128). XLA's side of a slab (the delta rule's WY factors
# and their autodiff: about ten such arrays) is what remains above the sequence-long o and
# its cotangent, so the budget sets the op's HBM (measured per budget in
# docs/results/kernels_tpu.md, "Slabs"). A slab costs a scan step and a saved state.
SLAB_BYTES = 1 << 26


def slab_of(slab, B: int, T: int, H: int, K: int, V: int, C: int) -> int:
    """Tokens per slab: ``slab`` (a positive multiple of ``C``; 0: one slab, the whole
    sequence) or, for None, the longest power of two (a multiple of ``C``, at least ``C``)
    whose float32 ``[B*H, slab, max(K, V, 128)]`` arrays are at most ``SLAB_BYTES`` (128:
    TPU HBM pads a narrower minor dim to 128 lanes). The result is ``T`` when the sequence
    fits one slab."""
    if slab is None:
        L = max(1, SLAB_BYTES // (4 * B * H * max(K, V, 128)))
        L = max(C, (1 << (L.bit_length() - 1)) // C * C)
    elif isinstance(slab, bool) or not isinstance(slab, int) or slab < 0 or slab % C:
        raise ValueError(f"{slab=} must be None, 0 (no slabs) or a positive multiple of the "
                         f"chunk {C}")
    else:
        L = slab or T
    return min(L, T)


@functools.cache
def _log_slabs(T, L):
    logging.getLogger(__name__).info(
        "Pallas linear kernel: %d tokens in slabs of %d (one more forward per slab in the "
        "backward; slab=0 turns slabs off)", T, L)


def over_slabs(run, xs, S0, L: int):
    """``run(xs, S) -> (o [B, L, ...], S')`` over the sequence in slabs of ``L`` tokens.

    ``xs``: per-token arrays ``[B, T, ...]`` (None passes through), ``S0 [B, H, K, V]``
    float32. The whole slabs run in :func:`_slab_scan` (a ``lax.scan`` carrying the state;
    its backward keeps only each slab's start state and recomputes the slab's forward
    before its backward). So what the kernels' callers compute in XLA around them (layout
    copies, gate cumsums, the delta rule's WY factors and their cotangents, the GPU
    walker's per-tile partial sums) is a slab's worth at a time, not the sequence's: one
    more forward per slab in the backward. Slab boundaries are chunk boundaries, so the
    chunk math is the same. A last partial slab runs after the scan."""
    B, T = xs[0].shape[:2]
    if L >= T:
        return run(xs, S0)
    n = T // L
    _log_slabs(T, L)
    have = [i for i, x in enumerate(xs) if x is not None]

    def run_some(arrays, S):  # run() on the present inputs only
        full = [None] * len(xs)
        for i, x in zip(have, arrays):
            full[i] = x
        return run(tuple(full), S)

    o, S = _slab_scan(run_some, L, tuple(xs[i][:, :n * L] for i in have), S0)
    o = jnp.moveaxis(o, 0, 1).reshape(B, n * L, *o.shape[3:])
    if n * L < T:
        o_tail, S = run(tuple(None if x is None else x[:, n * L:] for x in xs), S)
        o = jnp.concatenate([o, o_tail], axis=1)
    return o, S


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _slab_scan(run, L, xs, S0):
    """``run`` over the slabs of ``L`` tokens of ``xs [B, n L, ...]`` carrying the state:
    ``(o [n, B, L, ...], S_n)``. Each step slices its slab from the arrays as given (no
    stacked copy of the inputs). A custom VJP rather than ``jax.checkpoint`` around the
    scan body: its residuals are the inputs as given and the ``n`` start states (a
    checkpointed scan body stacks copies of its slab inputs as residuals: the sequence's
    bytes again)."""
    return _slab_fwd(run, L, xs, S0)[0]


def _slab(xs, i, L):
    return tuple(with_layout_constraint(jax.lax.dynamic_slice_in_dim(x, i * L, L, axis=1),
                                        Layout(tuple(range(x.ndim))))
                 for x in xs)


def _slab_fwd(run, L, xs, S0):
    def body(S, i):
        o, S_next = run(_slab(xs, i, L), S)
        return S_next, (o, S)

    S, (o, starts) = jax.lax.scan(body, S0, jnp.arange(xs[0].shape[1] // L))
    return (o, S), (xs, starts)


def _slab_bwd(run, L, res, cts):
    xs, starts = res
    do, dS = cts

    def body(dS, inp):  # last slab first: recompute its forward, then its backward
        i, S, do_i = inp
        _, vjp = jax.vjp(run, _slab(xs, i, L), S)
        dx, dS_prev = vjp((do_i, dS))
        return dS_prev, dx

    dS0, dxs = jax.lax.scan(body, dS, (jnp.arange(len(starts)), starts, do), reverse=True)
    B, n = xs[0].shape[0], len(starts)
    return tuple(jnp.moveaxis(d, 0, 1).reshape(B, n * L, *d.shape[3:]) for d in dxs), dS0


_slab_scan.defvjp(_slab_fwd, _slab_bwd)


# ----------------------------------------------------------------------------
# Preparation (outside the kernel): layout, padding, in-chunk cumulative gates.
# ----------------------------------------------------------------------------


def prepare_chunks(q, k, v, g, C):
    """[B, T, H, ...] -> [B*H, Tp, ...] (q, k, v in their dtype); gates -> (b, r)
    [B*H, Tp, Kg] float32, per chunk."""
    B, T, H, K = q.shape
    Tp = -(-T // C) * C

    def rows(x):
        x = jnp.moveaxis(x, 2, 1).reshape(B * H, T, *x.shape[3:])
        return jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))

    if g is None:  # zeros made directly: a cumsum of a constant gate would be folded by XLA
        b = jnp.zeros((B * H, Tp, 1), jnp.float32)  # at compile time (minutes at 1M tokens)
        return rows(q), rows(k), rows(v), b, b
    if g.ndim == 3:
        g = g[..., None]
    g = rows(g.astype(jnp.float32)).reshape(B * H, Tp // C, C, g.shape[-1])  # padding: g = 0, no change
    reset = jnp.isneginf(g)
    b = jnp.cumsum(jnp.where(reset, 0.0, g), axis=2).reshape(B * H, Tp, -1)
    r = jnp.cumsum(reset.astype(jnp.float32), axis=2).reshape(B * H, Tp, -1)
    return rows(q), rows(k), rows(v), b, r


def pack_gates(b, r, C):
    """The kernel's gate inputs: scalar ``b, r [N, Tp, 1]`` -> ``([N, n, 2, C],)`` (packed,
    lane-dense); per-key ``[N, Tp, K]`` -> ``(b, r)`` as they are."""
    if b.shape[-1] != 1:
        return b, r
    N, Tp, _ = b.shape
    return (jnp.stack([b.reshape(N, Tp // C, C), r.reshape(N, Tp // C, C)], axis=2),)


def gate_grad_shape(gates, N, Tp):
    """The kernel's gate gradient: ``[N, n, 1, C]`` packed, else ``[N, Tp, K]``, float32."""
    shape = ((*gates[0].shape[:2], 1, gates[0].shape[3]) if len(gates) == 1
             else (N, Tp, gates[0].shape[2]))
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def grad_shapes(*xs):
    """The gradients' ``ShapeDtypeStruct``s: each ``x``'s shape and dtype."""
    return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs)


# ----------------------------------------------------------------------------
# The chunk math (traced inside the kernel, and vmapped by the reference).
# ----------------------------------------------------------------------------


def exp_if(x, ok):
    return jnp.exp(jnp.where(ok, x, -jnp.inf))  # masked before the exp: never overflows


def gate_views(gates, C):
    """``(b, r [C, Kg], D)``: the column gates and, for a scalar gate (packed ``[2, C]``
    block), the in-chunk decays ``D_ij = exp(b_i - b_j) [j <= i, r_i == r_j]`` ``[C, C]``
    (masked before the exp); per key (``b, r [C, K]``) ``D`` is None: see :func:`_key_row`."""
    if len(gates) == 1:  # packed scalar gate: rows b, r
        (gp,) = gates
        b_row, r_row = pick_row(gp, 0), pick_row(gp, 1)
        b, r = to_col(b_row), to_col(r_row)
        causal = iota((C, C), 0) >= iota((C, C), 1)
        return b, r, exp_if(b - b_row, causal & (r == r_row))
    b, r = gates
    return b, r, None


def gate_cols(gates):
    """``(b, r [C, Kg])``: the column gates alone (packed scalar ``[2, C]`` or per key)."""
    if len(gates) == 1:
        return to_col(pick_row(gates[0], 0)), to_col(pick_row(gates[0], 1))
    return gates


def _pick_col(x, i):
    """Column ``i`` of ``x [C, C]`` as ``[C, 1]``."""
    return jnp.sum(jnp.where(iota(x.shape, 1) == i, x, 0.0), axis=1, keepdims=True)


def _key_row(q, b, r, i):
    """Per-key decays of query row ``i`` (traced): ``(q_i [1, K], M_i [C, K])`` with
    ``M_i[j, d] = exp(b_id - b_jd) [j <= i, r_id == r_jd]``. The ``[C, C, K]`` decays are
    never one array (Mosaic has no ``(C, K) -> (C, 1, K)`` reshape, and a ``fori_loop``
    over rows keeps one row's ``[C, K]`` live): the same ``C^2 K`` elementwise work."""
    b_i, r_i = pick_row(b, i), pick_row(r, i)
    ok = (iota(b.shape, 0) <= i) & (r == r_i)
    return pick_row(q, i), exp_if(b_i - b, ok)


def _score_col(q, k, b, r, i, AT):
    """``AT`` with column ``i`` set: ``A_ij = sum_d q_id k_jd M_i[j, d]`` over ``j``."""
    q_i, M_i = _key_row(q, b, r, i)
    C = AT.shape[0]
    col = jnp.sum(q_i * k * M_i, axis=1, keepdims=True)  # [C(j), 1]
    return AT + jnp.where(iota((C, C), 1) == i, col, 0.0), q_i, M_i


def key_scores_t(q, k, b, r):
    """Per-key gate: ``A^T`` (``[C(j), C(i)]``), ``A_ij = sum_d q_id k_jd M_i[j, d]``."""
    C = q.shape[0]
    return jax.lax.fori_loop(0, C, lambda i, AT: _score_col(q, k, b, r, i, AT)[0],
                             jnp.zeros((C, C), jnp.float32))


def chunk_fwd(q, k, v, *gates_and_S):
    """One chunk: ``q, k [C, K]``, ``v [C, V]``, gates (packed ``[2, C]`` or ``b, r [C, K]``),
    ``S [K, V]`` -> ``(o [C, V], S')``."""
    *gates, S = gates_and_S
    C = q.shape[0]
    b, r, D = gate_views(gates, C)
    A_v = dot(dot_nt(q, k) * D, v) if D is not None else dot_tn(key_scores_t(q, k, b, r), v)
    o = A_v + dot(q * exp_if(b, r == 0), S)
    return o, advance(k, v, b, r, S)


def advance(k, v, b, r, S):
    """``S' = exp(b_C) [r_C == 0] * S + (k * exp(b_C - b) [r == r_C])^T v`` (``b, r [C, Kg]``)."""
    C = k.shape[0]
    b_last, r_last = pick_row(b, C - 1), pick_row(r, C - 1)  # [1, Kg]
    k_out = k * exp_if(b_last - b, r == r_last)
    across = to_col(exp_if(b_last, r_last == 0))  # [Kg, 1]: S rows decay
    return across * S + dot_tn(k_out, v)


def chunk_state(q, k, v, *gates_and_S):
    """The state update of :func:`chunk_fwd` alone (the backward's recompute): ``S'``."""
    *gates, S = gates_and_S
    return advance(k, v, *gate_cols(gates), S)


def chunk_bwd(q, k, v, *rest):
    """Backward of :func:`chunk_fwd`, by hand, for a scalar or per-key gate.

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
    ``(dq, dk, dv, dgate, dS_prev)``, ``dgate`` a ``[1, C]`` row for the packed scalar
    gate (``b`` only), ``[C, K]`` per key.
    """
    *gates, S, do, dS = rest
    C = q.shape[0]
    b, r, D = gate_views(gates, C)
    scalar = D is not None
    e = exp_if(b, r == 0)  # [C, Kg]
    b_last, r_last = pick_row(b, C - 1), pick_row(r, C - 1)  # [1, Kg]
    f = exp_if(b_last - b, r == r_last)  # [C, Kg]
    a = exp_if(b_last, r_last == 0)  # [1, Kg]
    qe, kf = q * e, k * f
    dqe = dot_nt(do, S)  # [C, K]
    dkf = dot_nt(v, dS)  # [C, K]
    if scalar:  # [C, C] matrices and matmuls
        dA = dot_nt(do, v)
        A = dot_nt(q, k) * D
        dv = dot_tn(A, do)
        dP = dA * D
        dq, dk = dot(dP, k), dot_tn(dP, q)
        Z = dA * A
        dZ = (jnp.sum(Z, axis=1, keepdims=True)
              - to_col(jnp.sum(Z, axis=0, keepdims=True)))
    else:  # per-key gate: the decays one query row i at a time, as in the forward
        dAT = dot_nt(v, do)  # [C(j), C(i)]

        def row(i, carry):
            AT, dq, dk, dZ_out = carry
            AT, q_i, M_i = _score_col(q, k, b, r, i, AT)
            P_i = _pick_col(dAT, i) * M_i  # [C(j), K]: dA_ij M_i[j, d]
            dq_i = jnp.sum(P_i * k, axis=0, keepdims=True)  # [1, K]
            dq = dq + jnp.where(iota(q.shape, 0) == i, dq_i, 0.0)
            return AT, dq, dk + P_i * q_i, dZ_out + P_i * q_i * k

        zeros = jnp.zeros_like(q)  # dZ_out: sum_i Z_ijd, at row j
        AT, dq, dk, dZ_out = jax.lax.fori_loop(
            0, C, row, (jnp.zeros((C, C), jnp.float32), zeros, zeros, zeros))
        dZ = q * dq - dZ_out  # sum_j Z_ijd = q_id dq_id (before the state term)
        dv = dot(AT, do)
    dq = dq + dqe * e
    dk = dk + dkf * f
    dv = dv + dot(kf, dS)
    dF, dE = kf * dkf, qe * dqe  # [C, K]
    dSS = jnp.sum(dS * S, axis=1, keepdims=True)  # [K, 1]: per row of S
    if scalar:
        dF, dE = jnp.sum(dF, axis=1, keepdims=True), jnp.sum(dE, axis=1, keepdims=True)
        dSS = jnp.sum(dSS, axis=0, keepdims=True)  # [1, 1]
    else:
        dSS = to_row(dSS)  # [1, K]
    db = dZ + dE - dF
    last = jnp.sum(dF, axis=0, keepdims=True) + a * dSS  # [1, Kg]
    db = db + jnp.where(iota(db.shape, 0) == C - 1, last, 0.0)
    dS_prev = dot_tn(qe, do) + to_col(a) * dS
    return dq, dk, dv, (to_row(db) if scalar else db), dS_prev


def temporaries(C, K, V, Kg):
    """The chunk math's larger temporaries, for the VMEM accounting (block shapes)."""
    per_key = [(C, K)] * 8 if Kg > 1 else []
    return [(C, C)] * 8 + [(C, K)] * 8 + [(C, V)] * 4 + [(K, V)] * 2 + per_key


# ----------------------------------------------------------------------------
# The kernels behind a custom VJP, and the pure-JAX reference of the same math.
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _gla(q, k, v, gates, S0, C, M, walk, interpret):
    return tuple(walk.forward(chunk_fwd, (q, k, v, *gates), S0, C, interpret=interpret,
                              out_dtype=v.dtype, temporaries=_temps(q, v, gates, C)))


def _temps(q, v, gates, C):
    return temporaries(C, q.shape[-1], v.shape[-1], 1 if len(gates) == 1 else q.shape[-1])


def _gla_fwd(q, k, v, gates, S0, C, M, walk, interpret):
    o, S, states = walk.forward(chunk_fwd, (q, k, v, *gates), S0, C, interpret=interpret,
                                out_dtype=v.dtype, group=M,
                                temporaries=_temps(q, v, gates, C))
    return (o, S), (q, k, v, gates, states)


def _gla_bwd(C, M, walk, interpret, res, cts):
    q, k, v, gates, states = res
    N, Tp, _ = q.shape
    shapes = (*grad_shapes(q, k, v), gate_grad_shape(gates, N, Tp))
    dq, dk, dv, dg, dS0 = walk.backward(chunk_state, chunk_bwd, (q, k, v, *gates), shapes,
                                        states, *cts, C, group=M, interpret=interpret,
                                        temporaries=_temps(q, v, gates, C))
    if len(gates) == 1:  # packed [N, n, 2, C]: b gets dg, r none
        dgates = (jnp.concatenate([dg, jnp.zeros_like(dg)], axis=2),)
    else:
        dgates = (dg, jnp.zeros_like(gates[1]))
    return dq, dk, dv, dgates, dS0


_gla.defvjp(_gla_fwd, _gla_bwd)


def chunk_reference(q, k, v, gates, S0, C):
    """The kernel's math in plain JAX (same inputs and outputs as :func:`_gla`)."""
    N, Tp, K = q.shape

    def chunks(x):  # [N, Tp, ...] -> [n, N, C, ...]; [N, n, a, b] -> [n, N, a, b]
        x = x.reshape(N, Tp // C, C, *x.shape[2:]) if x.ndim == 3 else x
        return jnp.moveaxis(x.astype(jnp.float32), 1, 0)

    @jax.checkpoint  # the backward keeps only the state at each chunk start
    def body(S, xs):
        o, S = jax.vmap(chunk_fwd)(*xs, S)
        return S, o

    S, o = jax.lax.scan(body, S0, tuple(map(chunks, (q, k, v, *gates))))
    return jnp.moveaxis(o, 0, 1).reshape(N, Tp, -1), S


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64, interpret=False, group=None,
                     backend=None, slab=None):
    """(Gated) linear attention by the Pallas chunk kernels; see the module docstring.
    ``group``: chunks per saved state in the backward (default :func:`group_of`);
    ``backend``: ``"mosaic"`` (TPU), ``"triton"`` (GPU) or None (the target platform's);
    ``slab``: tokens per slab (:func:`slab_of`, :func:`over_slabs`; 0: none)."""
    fn = "longctx.kernels.linear_attention.linear_attention"
    B, T, H, K, V = check_inputs(fn, q, k, v, initial_state=initial_state,
                                 chunk_size=chunk_size, interpret=interpret)
    walk = walker_of(fn, backend, interpret)
    if g is not None and g.shape not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"g must be [B, T, H] or [B, T, H, K]; got {g.shape=}")
    C = chunk_of(walk, chunk_size, T, K, V, interpret, q.dtype)
    L = slab_of(slab, B, T, H, K, V, C)
    if L < T:
        def run(xs, S):
            return linear_attention(*xs[:3], g=xs[3], scale=scale, initial_state=S,
                                    output_final_state=True, chunk_size=chunk_size,
                                    interpret=interpret, group=group, backend=backend, slab=0)

        o, S = over_slabs(run, (q, k, v, g), start_state(initial_state, B, H, K, V), L)
        return o, (S if output_final_state else None)
    scale = K**-0.5 if scale is None else scale
    qr, kr, vr, b, r = prepare_chunks(q * scale, k, v, g, C)
    S0 = start_state(initial_state, B, H, K, V).reshape(B * H, K, V)
    M = group_of(walk, K, V, C, q.dtype, qr.shape[1] // C, group)
    o, S = _gla(qr, kr, vr, pack_gates(b, r, C), S0, C, M, walk, bool(interpret))
    o = jnp.moveaxis(o[:, :T].reshape(B, H, T, V), 1, 2).astype(v.dtype)
    return o, (S.reshape(B, H, K, V) if output_final_state else None)
