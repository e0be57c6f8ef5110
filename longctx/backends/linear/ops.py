"""Linear attention and the delta rule: parallel reference, recurrent and chunkwise forms.

One signature for every form (``form``), names as in flash-linear-attention::

    linear_attention(q, k, v, *, g=None, scale=None, initial_state=None,
                     output_final_state=False, normalize=False, chunk_size=64,
                     form="chunk") -> (o, final_state)
    delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, form="chunk") -> (o, final_state)

Layouts::

    q, k [B, T, H, K]     v [B, T, H, V]     o [B, T, H, V] (dtype of v)
    g    None | [B, T, H] | [B, T, H, K]     (log-space gates, g <= 0)
    beta [B, T, H]                            (delta rule write strength, usually in (0, 1))
    initial_state, final_state [B, H, K, V] float32

Recurrences (``S_t`` is ``[K, V]`` per batch row and head, ``q_t`` a row vector)::

    linear attention:  S_t = exp(g_t) * S_{t-1} + k_t^T v_t           o_t = (scale * q_t) S_t
    delta rule:        S_t = exp(g_t) * S_{t-1}
                       S_t = S_t + k_t^T (beta_t * (v_t - k_t S_t))   o_t = (scale * q_t) S_t

``g`` is ``None`` (plain linear attention / DeltaNet), ``[B, T, H]`` (one decay
per head and step: RetNet's fixed decays, simple GLA, Gated DeltaNet) or, for
``linear_attention`` only, ``[B, T, H, K]`` (a decay per key dimension, which
scales the rows of ``S``: GLA, Yang et al. 2023). ``scale`` defaults to
``K ** -0.5``. A gate may be ``-inf``: a hard reset (``exp(-inf) = 0`` clears
the state before the step's write; packed documents). Every form handles it
exactly (the chunk form counts resets apart from the finite gates, so it never
forms ``-inf - -inf``), and its gradient is 0.
``final_state`` is None unless ``output_final_state``. Inputs of
any float dtype are computed in float32 (states always accumulate in float32);
``o`` is cast back to the dtype of ``v``.

``normalize=True`` (linear attention only) divides ``o_t`` by
``(scale * q_t) . z_t + NORMALIZE_EPS`` with ``z_t = exp(g_t) * z_{t-1} + k_t``,
``z_0 = 0``: the keys of *this call*, decayed exactly like the state (Katharopoulos
et al. 2020 with the gate of the state). ``initial_state`` contributes to the
numerator only, as in fla; a caller that needs the normaliser across calls
carries it in the state itself by appending a column of ones to ``v`` (the
``linear`` mixer does). The normaliser is meant for positive feature maps
(elu+1, relu); ``NORMALIZE_EPS`` only guards a zero denominator.

Forms (all exact in exact arithmetic; the tests compare them on outputs, final
states and every gradient):

* ``"parallel"``: the readable quadratic reference. Linear attention is
  ``o = (q k^T * D) v + (q * exp(G)) S_0`` with the causal decay matrix
  ``D_ij = exp(G_i - G_j)`` (``G`` the cumulative log-gate, masked to ``j <= i``
  *before* the exp, so ``exp`` never sees a positive number). The delta rule is
  the WY / UT form below applied to the whole sequence as one block (a ``T x T``
  unit-triangular inverse).
* ``"recurrent"``: ``lax.scan`` over time, one rank-one update per step: the
  naive recurrence, and the decoding form (one token = one step).
* ``"chunk"``: chunkwise parallel (Yang et al. 2023, "Gated Linear Attention
  Transformers with Hardware-Efficient Training"): ``lax.scan`` over
  chunks of ``chunk_size`` tokens carrying the float32 state; inside a chunk the
  parallel form with the chunk's start state, its cumulative log-gates taken
  *relative to the chunk start* (so every exponent is ``<= 0`` at any length:
  a gate of -8 per step over a million tokens stays finite). The scan body is one
  ``jax.checkpoint``: the backward pass keeps only the ``[B, H, K, V]`` state at
  each chunk start and recomputes the chunk, so memory is linear in ``T`` with a
  ``chunk_size``-sized working set. The last chunk is padded with ``g = 0``,
  ``k = q = v = 0``, ``beta = 0``, which leaves the state unchanged.

Per-key gates inside a chunk (GLA) cannot be folded into ``q`` and ``k`` as
``q * exp(G)``, ``k * exp(-G)`` without overflowing (``exp(-G)`` grows without
bound). The chunk form uses the secondary-level chunking of the GLA paper:
sub-chunks of ``GLA_SUBCHUNK`` tokens; between sub-chunks ``I > J`` the factors
``q_i * exp(G_i - G_p)`` and ``k_j * exp(G_p - G_j)`` with ``p`` the last step
before sub-chunk ``I`` (both exponents ``<= 0``); within a diagonal sub-chunk the
explicit ``[c, c, K]`` tensor ``exp(G_i - G_j)`` masked to ``j <= i``.

Delta rule, chunk of length ``C`` with start state ``S_0`` and ``b`` the in-chunk
cumulative log-gate (Yang, Wang, Zhang, Shen, Kim 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"; gated form:
Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks"). Writing the
state as ``S_t = exp(b_t) S_0 + sum_{j<=t} exp(b_t - b_j) k_j^T u_j``, the
pseudo-values ``u`` solve the unit lower-triangular system::

    (I + A) U = diag(beta) (V - diag(exp(b)) K S_0),   A_ij = beta_i exp(b_i - b_j) k_i.k_j  (j < i)

so with ``T = (I + A)^{-1}`` (the UT transform, :func:`unit_lower_inverse`, float32)
``W = T diag(beta exp(b)) K`` and ``U~ = T diag(beta) V`` do not depend on ``S_0``,
``U = U~ - W S_0``, and::

    O       = diag(exp(b)) (scale Q) S_0 + ((scale Q) K^T * D) U     (D_ij = exp(b_i - b_j), j <= i)
    S_C     = exp(b_C) S_0 + (K * exp(b_C - b))^T U

Gradients are plain JAX autodiff of these forms (no custom VJP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx.kernels import delta_rule as pallas_delta
from longctx.kernels import linear_attention as pallas_linear

FORMS = ("chunk", "recurrent", "parallel")
NORMALIZE_EPS = 1e-6  # guards a zero normaliser only; see the module docstring
GLA_SUBCHUNK = 16  # secondary-level chunk for per-key gates (GLA paper)


# ----------------------------------------------------------------------------
# Checks: shapes and options, with the offending values in the message.
# ----------------------------------------------------------------------------


def _check(name, q, k, v, g, beta, initial_state, form, chunk_size, per_key_ok):
    if form not in FORMS:
        raise ValueError(f"{name}: unknown {form=!r}; expected one of {FORMS}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: {chunk_size=} must be a positive int")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{name} expects q, k [B, T, H, K] and v [B, T, H, V]; got "
                         f"{q.shape=} {k.shape=} {v.shape=}")
    if k.shape != q.shape:
        raise ValueError(f"{name}: q and k must have the same shape [B, T, H, K]; got "
                         f"{q.shape=} {k.shape=}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}: v must agree with q on [B, T, H]; got {q.shape=} {v.shape=}")
    B, T, H, K = q.shape
    V = v.shape[3]
    if g is not None:
        shapes = ((B, T, H), (B, T, H, K)) if per_key_ok else ((B, T, H),)
        if g.shape not in shapes:
            raise ValueError(f"{name}: g must be one of the shapes "
                             f"{' or '.join(map(str, shapes))} (None: no gate); got {g.shape=}")
    if beta is not None and beta.shape != (B, T, H):
        raise ValueError(f"{name}: beta must be [B, T, H] = {(B, T, H)}; got {beta.shape=}")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"{name}: initial_state must be [B, H, K, V] = {(B, H, K, V)}; got "
                         f"{initial_state.shape=}")


def _f32(x):
    return None if x is None else jnp.asarray(x).astype(jnp.float32)


def _heads_first(x):
    """[B, T, H, ...] -> [B, H, T, ...] (None passes through)."""
    return None if x is None else jnp.moveaxis(x, 2, 1)


def _tril(n, strict=False):
    return jnp.tril(jnp.ones((n, n), bool), -1 if strict else 0)


def _cum_gate(g):
    """Cumulative log-gate along the block, split into a finite part and resets.

    ``g [B, H, L(, K)]`` may hold ``-inf`` (a hard reset: ``exp(-inf) = 0`` clears
    the state). Returns ``b`` = cumsum of the finite gates and ``r`` = the number
    of resets so far (both inclusive). The decay from step ``j`` to step ``i >= j``
    is ``exp(b_i - b_j)`` if ``r_i == r_j`` (no reset in ``(j, i]``) else 0, so
    ``-inf - -inf`` is never formed.
    """
    reset = jnp.isneginf(g)
    b = jnp.cumsum(jnp.where(reset, 0.0, g), axis=2)  # non-increasing, <= 0
    return b, jnp.cumsum(reset.astype(jnp.int32), axis=2)


def _exp_if(x, ok):
    """``exp(x)`` where ``ok`` else 0, masked *before* the exp (``x`` may be large there)."""
    return jnp.exp(jnp.where(ok, x, -jnp.inf))


def _decay_matrix(b, r, mask):
    """``D_ij = exp(b_i - b_j)`` where ``mask`` and no reset in ``(j, i]``, else 0.

    ``b, r [..., L]`` -> ``[..., L, L]``. The mask is applied *before* the exp:
    above the diagonal ``b_i - b_j`` can be a large positive number, and ``exp``
    of it would overflow (and poison the gradient with ``inf * 0``).
    """
    ok = mask & (r[..., :, None] == r[..., None, :])
    return _exp_if(b[..., :, None] - b[..., None, :], ok)


# ----------------------------------------------------------------------------
# One block of the parallel form: the reference, and the body of the chunk scan.
# Layout inside: [B, H, L, ...] float32, q already multiplied by scale.
# ----------------------------------------------------------------------------


def _per_key_scores(q, k, b, r, sub):
    """``A_ij = sum_d q_id k_jd D_ijd``, ``D`` the per-key decays of ``(b, r)``: ``[B, H, L, L]``.

    ``sub=None``: the explicit ``[L, L, K]`` decay tensor (the reference).
    ``sub=c``: GLA's secondary chunking with sub-chunks of ``c`` tokens, every
    exponent ``<= 0`` (see the module docstring). A reset between ``j`` and ``i``
    falls in ``(j, p]`` or ``(p, i]``, so the factorisation through ``p`` holds.
    """
    L, K = q.shape[-2:]
    if sub is None or sub >= L or L % sub:
        d = _exp_if(b[..., :, None, :] - b[..., None, :, :],
                    _tril(L)[:, :, None] & (r[..., :, None, :] == r[..., None, :, :]))
        return jnp.einsum("bhid,bhjd,bhijd->bhij", q, k, d)  # d: [B, H, L, L, K]
    n = L // sub
    lead = q.shape[:-2]
    qs, ks, bs, rs = (x.reshape(*lead, n, sub, K) for x in (q, k, b, r))  # [B, H, n, c, K]
    # Diagonal sub-blocks: explicit [c, c, K] decays.
    d = _exp_if(bs[..., :, None, :] - bs[..., None, :, :],
                _tril(sub)[:, :, None] & (rs[..., :, None, :] == rs[..., None, :, :]))
    diag = jnp.einsum("bhnid,bhnjd,bhnijd->bhnij", qs, ks, d)  # [B, H, n, c, c]
    # Off-diagonal: reference point p_I = last step of sub-chunk I-1 (for I = 0 the
    # block start, b = r = 0; it has nothing off-diagonal).
    def ref(x):
        return jnp.concatenate([jnp.zeros_like(x[..., :1, -1, :]), x[..., :-1, -1, :]], axis=-2)

    bp, rp = ref(bs), ref(rs)  # [B, H, n, K]
    q_off = qs * _exp_if(bs - bp[..., :, None, :], rs == rp[..., :, None, :])  # exponent <= 0
    before = (jnp.arange(L)[None, :] < (jnp.arange(n) * sub)[:, None])  # [n, L]: j < start_I
    k_off = k[..., None, :, :] * _exp_if(
        bp[..., :, None, :] - b[..., None, :, :],
        before[:, :, None] & (rp[..., :, None, :] == r[..., None, :, :]))  # [B, H, n, L, K]
    off = jnp.einsum("bhnid,bhnjd->bhnij", q_off, k_off)  # [B, H, n, c, L]
    eye = jnp.eye(n, dtype=q.dtype)
    diag_full = jnp.einsum("bhnij,nm->bhnimj", diag, eye).reshape(*lead, n, sub, L)
    return (off + diag_full).reshape(*lead, L, L)


def _boundary_decays(b, r):
    """Decays to and from the block boundaries, ``b, r [B, H, L, K or 1]``.

    Returns ``exp(b_i)`` (start state to step i), ``exp(b_L - b_j)`` (step j to the
    end) and ``exp(b_L)`` as ``[B, H, K or 1, 1]`` (start state to the end).
    """
    b_last, r_last = b[:, :, -1:], r[:, :, -1:]  # [B, H, 1, K or 1]
    to_step = _exp_if(b, r == 0)
    to_end = _exp_if(b_last - b, r == r_last)
    across = _exp_if(b_last, r_last == 0)[:, :, 0][..., None]
    return to_step, to_end, across


def _linear_block(q, k, v, g, S0, *, sub=None):
    """Parallel form on one block: ``(o [B, H, L, V], S_L [B, H, K, V])``.

    ``g`` is None, ``[B, H, L]`` or ``[B, H, L, K]``; cumulated from the block start.
    """
    L = q.shape[-2]
    if g is None:
        A = jnp.einsum("bhik,bhjk->bhij", q, k) * _tril(L)
        q_in, k_out, a = q, k, None
    else:
        b, r = _cum_gate(g)  # [B, H, L(, K)]
        if g.ndim == 3:  # one decay per head and step
            A = jnp.einsum("bhik,bhjk->bhij", q, k) * _decay_matrix(b, r, _tril(L))
            b, r = b[..., None], r[..., None]  # [B, H, L, 1] broadcasts over K below
        else:
            A = _per_key_scores(q, k, b, r, sub)
        to_step, to_end, a = _boundary_decays(b, r)
        q_in = q * to_step  # decay of S0 up to step i
        k_out = k * to_end  # decay of k_j v_j from step j to the block end
    o = jnp.einsum("bhij,bhjv->bhiv", A, v)
    S_L = jnp.einsum("bhjk,bhjv->bhkv", k_out, v)
    if S0 is not None:
        o = o + jnp.einsum("bhik,bhkv->bhiv", q_in, S0)
        S_L = S_L + (S0 if a is None else a * S0)
    return o, S_L


def unit_lower_inverse(A):
    """``(I + A)^{-1}`` for a strictly lower-triangular ``A [..., C, C]`` (the UT transform).

    Recursive block inversion in matmuls only: with the inverses of the two
    diagonal halves known, ``[[L11, 0], [L21, L22]]^{-1} =
    [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]``; starting from 1x1 blocks
    (the unit diagonal), ``log2(C)`` levels each batched over all blocks. This is
    the blocked substitution of ``trsm`` (same rounding behaviour, unlike a
    Neumann series), but plain XLA: no LAPACK custom call on CPU (whose batched
    ``trsm`` inside a scan was seen to deadlock intermittently here) and it runs
    as matmuls on any accelerator. ``C`` is padded to a power of two with an
    identity block (which does not change the top-left inverse).
    """
    C = A.shape[-1]
    P = 1 << max(C - 1, 0).bit_length()
    lead = A.shape[:-2]
    if P != C:
        A = jnp.pad(A, [(0, 0)] * len(lead) + [(0, P - C), (0, P - C)])
    inv = jnp.ones(lead + (P, 1, 1), A.dtype)  # [..., P / m, m, m]: inverses of diagonal blocks
    m = 1
    while m < P:
        nb = P // (2 * m)
        p, i = jnp.arange(nb)[:, None, None], jnp.arange(m)
        L21 = A[..., (2 * p + 1) * m + i[:, None], 2 * p * m + i[None, :]]  # [..., nb, m, m]
        pairs = inv.reshape(lead + (nb, 2, m, m))
        I11, I22 = pairs[..., 0, :, :], pairs[..., 1, :, :]
        X21 = -jnp.einsum("...ij,...jk,...kl->...il", I22, L21, I11)
        top = jnp.concatenate([I11, jnp.zeros_like(I11)], axis=-1)
        inv = jnp.concatenate([top, jnp.concatenate([X21, I22], axis=-1)], axis=-2)
        m *= 2
    return inv.reshape(lead + (P, P))[..., :C, :C]


def _delta_block(q, k, v, beta, g, S0):
    """WY / UT form of the (gated) delta rule on one block (module docstring)."""
    L = q.shape[-2]
    if g is None:
        decay_strict = _tril(L, strict=True).astype(q.dtype)
        decay = _tril(L).astype(q.dtype)
        q_in, k_out, a = q, k, None
    else:
        b, r = _cum_gate(g)  # [B, H, L]
        decay_strict = _decay_matrix(b, r, _tril(L, strict=True))
        decay = _decay_matrix(b, r, _tril(L))
        to_step, to_end, a = _boundary_decays(b[..., None], r[..., None])
        q_in, k_out = q * to_step, k * to_end
    kb = k * beta[..., None]
    A = jnp.einsum("bhik,bhjk->bhij", kb, k) * decay_strict  # strictly lower
    rhs = jnp.concatenate([v * beta[..., None], kb if g is None else kb * to_step], axis=-1)
    X = jnp.einsum("bhij,bhjd->bhid", unit_lower_inverse(A), rhs)  # (I + A) X = rhs
    V = v.shape[-1]
    U, W = X[..., :V], X[..., V:]  # U~ [B, H, L, V], W [B, H, L, K]
    if S0 is not None:
        U = U - jnp.einsum("bhik,bhkv->bhiv", W, S0)
    P = jnp.einsum("bhik,bhjk->bhij", q, k) * decay
    o = jnp.einsum("bhij,bhjv->bhiv", P, U)
    S_L = jnp.einsum("bhjk,bhjv->bhkv", k_out, U)
    if S0 is not None:
        o = o + jnp.einsum("bhik,bhkv->bhiv", q_in, S0)
        S_L = S_L + (S0 if a is None else a * S0)
    return o, S_L


# ----------------------------------------------------------------------------
# The three forms. Inputs: [B, T, H, ...] float32, q already scaled.
# ----------------------------------------------------------------------------


def _parallel(block, q, k, v, extras, S0):
    """The whole sequence as one block: quadratic in T (the reference)."""
    o, S = block(*map(_heads_first, (q, k, v, *extras)), S0)
    return jnp.moveaxis(o, 1, 2), S


def _linear_step(S, x):
    q, k, v, g = x  # [B, H, K], [B, H, K], [B, H, V], None | [B, H] | [B, H, K]
    if g is not None:
        S = S * jnp.exp(g if g.ndim == 3 else g[..., None])[..., None]
    S = S + k[..., :, None] * v[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", q, S)


def _delta_step(S, x):
    q, k, v, beta, g = x  # [B, H, K], [B, H, K], [B, H, V], [B, H], None | [B, H]
    if g is not None:
        S = S * jnp.exp(g)[..., None, None]
    u = beta[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, S))
    S = S + k[..., :, None] * u[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", q, S)


def _recurrent(step, q, k, v, extras, S0):
    """``lax.scan`` over time: one step per token (also the decoding form)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S0 = jnp.zeros((B, H, K, V), jnp.float32) if S0 is None else S0
    xs = tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in (q, k, v, *extras))
    S, o = jax.lax.scan(step, S0, xs)  # o [T, B, H, V]
    return jnp.moveaxis(o, 0, 1), S


def _chunked(block, q, k, v, extras, S0, chunk_size):
    """``lax.scan`` over chunks carrying the float32 state; each chunk is one checkpoint."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = max(1, min(chunk_size, T))  # a sequence shorter than a chunk is one chunk
    N = -(-T // C)
    pad = N * C - T

    def chunks(x):  # [B, T, H, ...] -> [N, B, H, C, ...]; padding: zeros (g = 0, beta = 0)
        if x is None:
            return None
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, N, C, *x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

    @jax.checkpoint  # keep only the state at each chunk start for the backward pass
    def body(S, xs):
        o, S = block(*xs, S)
        return S, o

    S0 = jnp.zeros((B, H, K, V), jnp.float32) if S0 is None else S0
    S, o = jax.lax.scan(body, S0, tuple(map(chunks, (q, k, v, *extras))))  # o [N,B,H,C,V]
    o = jnp.moveaxis(o, 0, 2).reshape(B, H, N * C, V)[:, :, :T]
    return jnp.moveaxis(o, 1, 2), S


def _run(form, block, step, q, k, v, extras, S0, chunk_size):
    if form == "parallel":
        return _parallel(block, q, k, v, extras, S0)
    if form == "recurrent":
        return _recurrent(step, q, k, v, extras, S0)
    return _chunked(block, q, k, v, extras, S0, chunk_size)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def chunk_flops(tokens: int, *, key_dim: int, value_dim: int, chunk_size: int,
                delta: bool) -> float:
    """Forward matmul FLOPs of the chunk form for ``tokens`` (token, head) pairs.

    Per chunk of ``C`` tokens and head (``2 m n k`` per matmul), linear attention
    (:func:`_linear_block`): scores ``q k^T`` ``2C^2 K``, ``A v`` ``2C^2 V``, the
    chunk's state ``k^T v`` ``2CKV`` and the read of the start state ``q S_0`` ``2CKV``.
    The delta rule (:func:`_delta_block`) adds ``k k^T`` (``2C^2 K``), the UT
    inverse (:func:`unit_lower_inverse`: ``sum_m 2 P m^2`` over its levels, ``P`` =
    ``C`` rounded up to a power of two), its product with ``[v, k]``
    (``2C^2 (V + K)``) and ``W S_0`` (``2CKV``). Per-key gates (GLA) are counted as
    one score matmul. Elementwise work (gates, decays) is not counted.
    """
    C, K, V = chunk_size, key_dim, value_dim
    per_chunk = 2 * C * C * (K + V) + 4 * C * K * V
    if delta:
        P = 1 << max(C - 1, 0).bit_length()
        inverse = sum(2 * P * (1 << i) ** 2 for i in range(P.bit_length() - 1))
        per_chunk += 2 * C * C * K + inverse + 2 * C * C * (V + K) + 2 * C * K * V
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
    _check("linear_attention", q, k, v, g, None, initial_state, form, chunk_size,
           per_key_ok=True)
    out_dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, S0 = map(_f32, (q, k, v, g, initial_state))
    q = q * scale
    V = v.shape[-1]
    if normalize:  # the normaliser z_t rides along as an extra value column of ones
        v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
        if S0 is not None:
            S0 = jnp.concatenate([S0, jnp.zeros_like(S0[..., :1])], axis=-1)
    sub = GLA_SUBCHUNK if form == "chunk" else None

    def block(q, k, v, g, S):
        return _linear_block(q, k, v, g, S, sub=sub)

    o, S = _run(form, block, _linear_step, q, k, v, (g,), S0, chunk_size)
    if normalize:
        o = o[..., :V] / (o[..., V:] + NORMALIZE_EPS)
        S = S[..., :V]
    return o.astype(out_dtype), (S if output_final_state else None)


def delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, form="chunk"):
    """DeltaNet (``g=None``) and Gated DeltaNet (``g [B, T, H]``); see the module docstring.

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
    _check("delta_rule", q, k, v, g, beta, initial_state, form, chunk_size, per_key_ok=False)
    out_dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, beta, g, S0 = map(_f32, (q, k, v, beta, g, initial_state))
    o, S = _run(form, _delta_block, _delta_step, q * scale, k, v, (beta, g), S0, chunk_size)
    return o.astype(out_dtype), (S if output_final_state else None)
