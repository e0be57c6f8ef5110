"""One block of the parallel form of every linear-family op, as an affine map of its start state.

A block is ``L`` consecutive tokens (a chunk, or the whole sequence for the
``parallel`` reference). Every op here is linear in the state, so a block is
fully described, for any start state ``S_0 [K, V]``, by::

    o   = o_intra + q_eff S_0                 o_intra [L, V], q_eff [L, K]
    S_L = decay * S_0 + U                     decay [G, 1] (G = 1 or K; None: 1), U [K, V]
    S_L = M S_0 + U                           (delta rules: M [K, K] replaces decay)

Each block function below returns that :class:`Affine` tuple, computed from the
block's inputs alone (no ``S_0``), with any number of leading batch axes
``[..., L, ·]``. The drivers in :mod:`~longctx.backends.linear.forms` evaluate
it for all chunks of a sequence at once (batched matmuls), run only the small
state recurrence ``S_{n+1} = decay_n S_n + U_n`` sequentially, and add the
inter-chunk term ``q_eff S_n`` for all chunks at once again.

Gates are in log space, ``[..., L]`` (one per step) or ``[..., L, K]`` (one per
key), cumulated from the block start (so every exponent is ``<= 0`` at any
length). A gate of ``-inf`` is a hard reset, handled by counting resets apart
from the finite gates (:func:`cum_gate`). Per-key gates use one factored matmul
per block where that is exact (:func:`factored_scores`, :func:`factored_ok`: no
resets, bounded decay per half block), else GLA's secondary chunking
(:func:`gated_scores`). The derivation of each block is in its
docstring; the tests compare every block against float64 loops over time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Gate(NamedTuple):
    """A cumulative log-gate split into its finite part and its resets, ``[..., L, G]``."""

    b: jax.Array  # cumulative sum of the finite gates (non-increasing, <= 0)
    r: jax.Array  # int32: number of resets (-inf gates) so far


class Affine(NamedTuple):
    """A block as an affine map of its start state (module docstring)."""

    o: jax.Array  # [..., L, V]: the output from the block's own tokens
    q_eff: jax.Array  # [..., L, K]: o += q_eff @ S_0
    decay: jax.Array | None  # [..., G, 1]: S_L = decay * S_0 + U (None: decay 1)
    M: jax.Array | None  # [..., K, K]: S_L = M @ S_0 + U (delta rules; then decay is None)
    U: jax.Array  # [..., K, V]


def tril(n, strict=False):
    return jnp.tril(jnp.ones((n, n), bool), -1 if strict else 0)


def exp_if(x, ok):
    """``exp(x)`` where ``ok`` else 0, masked *before* the exp (``x`` may be large there)."""
    return jnp.exp(jnp.where(ok, x, -jnp.inf))


def cum_gate(g, resets=True):
    """``g [..., L, G]`` -> (inclusive, exclusive) cumulative :class:`Gate` s.

    Inclusive at step ``i``: gates ``1..i``; exclusive: gates ``1..i-1`` (the state
    *before* step ``i``'s decay: RWKV-6's read, RWKV-7's low-rank read). The decay
    from (after) step ``j`` to step ``i`` is ``exp(b_i - b_j)`` if ``r_i == r_j`` (no
    reset in between) else 0, so ``-inf - -inf`` is never formed.
    """
    if not resets:  # the caller guarantees finite gates (FACTORED): a broadcastable 0 count
        r = jnp.zeros((1,) * g.ndim, jnp.int32)
        b = jnp.cumsum(g, axis=-2)
        return Gate(b, r), Gate(b - g, r)
    reset = jnp.isneginf(g)
    gf = jnp.where(reset, 0.0, g)
    ri = reset.astype(jnp.int32)
    b, r = jnp.cumsum(gf, axis=-2), jnp.cumsum(ri, axis=-2)
    return Gate(b, r), Gate(b - gf, r - ri)


def _mul(x, f):
    return x if f is None else x * f


def _explicit_scores(q, k, gq, gk, mask):
    """``sum_d q_id k_jd exp(bq_id - bk_jd)`` through the explicit ``[L, L, K]`` decays.

    Written as a product and a sum (not an einsum) so that XLA fuses the exp into
    the reduction instead of materialising the ``[L, L, K]`` tensor.
    """
    ok = mask[:, :, None] & (gq.r[..., :, None, :] == gk.r[..., None, :, :])
    d = exp_if(gq.b[..., :, None, :] - gk.b[..., None, :, :], ok)
    return jnp.sum(q[..., :, None, :] * k[..., None, :, :] * d, axis=-1)


# ``sub`` value of the blocks: per-key scores by one factored matmul (:func:`factored_scores`),
# for inputs where :func:`factored_ok` holds (the ops check it and fall back to sub-chunks).
FACTORED = "factored"
# The factored scores multiply factors up to exp(FACTOR_MAX_EXP) and down to
# exp(-FACTOR_MAX_EXP): inside float32's range (exp(+-88)) with room for |q|, |k| and sums.
FACTOR_MAX_EXP = 60.0


def factored_scores(q, k, gq, gk, mask):
    """``sum_d q_id k_jd exp(bq_id - bk_jd)`` as one matmul of ``q exp(bq - m)`` and
    ``k exp(m - bk)``, with ``m`` the inclusive gate at the block's middle step ``L // 2``.

    No ``[L, L, K]`` decays and one exp per element of ``q`` and ``k`` (as
    flash-linear-attention's chunk kernels for bounded decays, e.g. RWKV-7's
    ``w >= -0.61``). Exact while every ``|b - m| <= FACTOR_MAX_EXP`` and no gate is a
    reset (:func:`factored_ok`); the reference point in the middle halves the largest
    exponent against the block start. ``b`` is monotone, so
    ``max |b - m| = max(-m, m - b_L)`` (the exclusive gate adds only the start, 0).
    """
    L = q.shape[-2]
    m = gk.b[..., L // 2:L // 2 + 1, :]  # [..., 1, K]
    A = jnp.einsum("...id,...jd->...ij", q * jnp.exp(gq.b - m), k * jnp.exp(m - gk.b))
    # Above the diagonal the products are exp(b_i - b_j) with b_i > b_j: up to exp(120),
    # inf in float32. Selected away (a where: `A * mask` would make inf * 0 = nan).
    return jnp.where(mask, A, 0.0)


def factored_ok(g, chunk_size):
    """Whether :func:`factored_scores` is exact for every chunk of the per-key log gate
    ``g [B, T, H, K]`` (chunks of ``chunk_size``, zero-padded, as the chunk forms cut
    them): no reset, and the decay over steps ``1..L//2+1`` and over the rest of each
    chunk at most ``FACTOR_MAX_EXP`` in every key. A scalar bool (traced)."""
    B, T = g.shape[:2]
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    gc = jnp.pad(g, [(0, 0), (0, N * C - T)] + [(0, 0)] * (g.ndim - 2))
    gc = gc.reshape(B, N, C, *g.shape[2:])
    h = C // 2 + 1
    first, rest = -jnp.sum(gc[:, :, :h], axis=2), -jnp.sum(gc[:, :, h:], axis=2)
    return ((jnp.max(first) <= FACTOR_MAX_EXP) & (jnp.max(rest) <= FACTOR_MAX_EXP)
            & ~jnp.any(jnp.isneginf(g)))


def gated_scores(q, k, gq, gk, *, strict, sub=None):
    """``A_ij = sum_d q_id k_jd exp(bq_id - bk_jd)`` for ``j <= i`` (``j < i`` if ``strict``).

    ``q, k [..., L, K]``; ``gq, gk`` :class:`Gate` s ``[..., L, 1 or K]`` (None: no gate)
    with ``gk`` inclusive and ``gq`` inclusive or exclusive; 0 across a reset.
    Returns ``[..., L, L]``.

    Per-key gates cannot be folded into ``q`` and ``k`` as ``q * exp(b)``,
    ``k * exp(-b)`` (``exp(-b)`` overflows). ``sub=c`` uses the secondary-level
    chunking of the GLA paper (Yang et al. 2023): sub-chunks of ``c`` tokens;
    between sub-chunks ``I > J`` the factors ``q_i exp(bq_i - b_p)`` and
    ``k_j exp(b_p - b_j)`` with ``p`` the last step before sub-chunk ``I`` (both
    exponents ``<= 0``, also for an exclusive ``gq``: ``bq_i <= b_p``); within a
    diagonal sub-chunk the explicit decays. ``sub=None`` (or ``L`` not a multiple):
    explicit decays everywhere (the reference). ``sub=FACTORED``: one factored matmul
    (:func:`factored_scores`; only where :func:`factored_ok`).
    """
    L, K = q.shape[-2:]
    mask = tril(L, strict)
    if gq is None:
        return jnp.einsum("...id,...jd->...ij", q, k) * mask
    if gq.b.shape[-1] == 1:  # one gate per step: an [L, L] decay matrix
        ok = mask & (gq.r[..., :, None, 0] == gk.r[..., None, :, 0])
        d = exp_if(gq.b[..., :, None, 0] - gk.b[..., None, :, 0], ok)
        return jnp.einsum("...id,...jd->...ij", q, k) * d
    if sub == FACTORED:
        return factored_scores(q, k, gq, gk, mask)
    if sub is None or sub >= L or L % sub:
        return _explicit_scores(q, k, gq, gk, mask)
    lead = q.shape[:-2]
    if len(lead) != 1:  # one batch axis: XLA:CPU's backward of this graph segfaulted with
        flat = lambda x: x.reshape(-1, *x.shape[-2:])  # noqa: E731   leading axes (1, 2, 2)
        A = gated_scores(flat(q), flat(k), Gate(flat(gq.b), flat(gq.r)),
                         Gate(flat(gk.b), flat(gk.r)), strict=strict, sub=sub)
        return A.reshape(*lead, L, L)
    n = L // sub

    def split(x):  # [..., L, K] -> [..., n, c, K]
        return x.reshape(*lead, n, sub, x.shape[-1])

    qs, ks = split(q), split(k)
    gqs, gks = Gate(split(gq.b), split(gq.r)), Gate(split(gk.b), split(gk.r))
    diag = _explicit_scores(qs, ks, gqs, gks, tril(sub, strict))  # [..., n, c, c]

    def ref(x):  # the last step of sub-chunk I-1 ([..., n, K]); block start (0) for I = 0
        return jnp.concatenate([jnp.zeros_like(x[..., :1, -1, :]), x[..., :-1, -1, :]], axis=-2)

    bp, rp = ref(gks.b), ref(gks.r)
    q_off = qs * exp_if(gqs.b - bp[..., :, None, :], gqs.r == rp[..., :, None, :])
    before = jnp.arange(L)[None, :] < (jnp.arange(n) * sub)[:, None]  # [n, L]: j < start_I
    k_off = k[..., None, :, :] * exp_if(
        bp[..., :, None, :] - gk.b[..., None, :, :],
        before[:, :, None] & (rp[..., :, None, :] == gk.r[..., None, :, :]))  # [..., n, L, K]
    off = jnp.einsum("...nid,...njd->...nij", q_off, k_off)  # [..., n, c, L]
    diag_full = jnp.einsum("...nij,nm->...nimj", diag, jnp.eye(n, dtype=q.dtype))
    return (off + diag_full.reshape(*lead, n, sub, L)).reshape(*lead, L, L)


def boundary_decays(gi):
    """From an inclusive :class:`Gate` ``[..., L, G]``: ``exp(b_i)`` (start -> step i,
    ``[..., L, G]``), ``exp(b_L - b_j)`` (step j -> end, ``[..., L, G]``) and
    ``exp(b_L)`` (start -> end, ``[..., G, 1]``). All None without a gate."""
    if gi is None:
        return None, None, None
    b_last, r_last = gi.b[..., -1:, :], gi.r[..., -1:, :]
    to_step = exp_if(gi.b, gi.r == 0)
    to_end = exp_if(b_last - gi.b, gi.r == r_last)
    across = jnp.swapaxes(exp_if(b_last, r_last == 0), -1, -2)
    return to_step, to_end, across


def _as_gate(g, q):
    """Scalar gates ``[..., L]`` get a trailing axis of 1; per-key gates are ``[..., L, K]``."""
    if g is None:
        return None
    return g if g.ndim == q.ndim else g[..., None]


def _eye_decay(across, K, dtype):
    """``diag(across)`` as a ``[..., K, K]`` matrix (identity without a gate)."""
    eye = jnp.eye(K, dtype=dtype)
    return eye if across is None else eye * across


def linear_block(q, k, v, g, *, sub=None):
    """(Gated) linear attention, ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    ``o = (q k^T * D) v`` with the causal decays ``D``; ``q_eff = q exp(b)``;
    ``U = (k exp(b_L - b))^T v``, ``decay = exp(b_L)``.
    """
    g = _as_gate(g, q)
    gi = None if g is None else cum_gate(g, sub != FACTORED)[0]
    A = gated_scores(q, k, gi, gi, strict=False, sub=sub)
    to_step, to_end, across = boundary_decays(gi)
    return Affine(o=jnp.einsum("...ij,...jv->...iv", A, v), q_eff=_mul(q, to_step),
                  decay=across, M=None,
                  U=jnp.einsum("...jk,...jv->...kv", _mul(k, to_end), v))


def rwkv6_block(r, k, v, w, ruk, *, sub=None):
    """RWKV-6: ``o_t = r_t (S_{t-1} + diag(u) k_t^T v_t)``, ``S_t = exp(w_t) S_{t-1} + k_t^T v_t``.

    The read is of the state *before* step t: scores with the exclusive gate, strictly
    below the diagonal, plus the bonus ``ruk_t v_t`` with ``ruk_t = sum_d r_td u_d k_td``
    (``ruk [..., L]``, computed by the caller). ``q_eff = r exp(b_{t-1})``.
    """
    gi, ge = cum_gate(w, sub != FACTORED)
    A = gated_scores(r, k, ge, gi, strict=True, sub=sub)
    _, to_end, across = boundary_decays(gi)
    o = jnp.einsum("...ij,...jv->...iv", A, v) + ruk[..., None] * v
    return Affine(o=o, q_eff=r * exp_if(ge.b, ge.r == 0), decay=across, M=None,
                  U=jnp.einsum("...jk,...jv->...kv", k * to_end, v))


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


def delta_block(q, k, v, beta, g, *, sub=None):
    """The (gated) delta rule by the WY / UT representation; ``g`` None | scalar | per key (KDA).

    Per step ``S_t = exp(g_t) S_{t-1}; S_t += k_t^T beta_t (v_t - k_t S_t)``
    (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule";
    gated: Yang, Kautz, Hatamizadeh 2024; per-key decay: Kimi Delta Attention,
    Kimi Team 2025). With ``Gamma_{i<-j}`` the decay from step j to i, the state is
    ``S_t = Gamma_{t<-0} S_0 + sum_{j<=t} Gamma_{t<-j} k_j^T u_j`` and the
    pseudo-values ``u`` solve the unit lower-triangular system::

        (I + A) U = diag(beta) (V - (K exp(b)) S_0),   A_ij = beta_i k_i Gamma_{i<-j} k_j^T  (j < i)

    so with ``T = (I + A)^{-1}`` (:func:`unit_lower_inverse`) ``W = T diag(beta) (K exp(b))``
    and ``U~ = T diag(beta) V`` do not depend on ``S_0``, ``U = U~ - W S_0``, and with
    ``P_ij = q_i Gamma_{i<-j} k_j^T`` (``j <= i``) and ``Kd = K exp(b_L - b)``::

        o   = P U~ + (q exp(b) - P W) S_0        S_L = Kd^T U~ + (diag(exp(b_L)) - Kd^T W) S_0
    """
    g = _as_gate(g, q)
    gi = None if g is None else cum_gate(g, sub != FACTORED)[0]
    kb = k * beta[..., None]
    A = gated_scores(kb, k, gi, gi, strict=True, sub=sub)  # strictly lower
    to_step, to_end, across = boundary_decays(gi)
    rhs = jnp.concatenate([v * beta[..., None], _mul(kb, to_step)], axis=-1)
    X = jnp.einsum("...ij,...jd->...id", unit_lower_inverse(A), rhs)
    V, K = v.shape[-1], k.shape[-1]
    Ut, W = X[..., :V], X[..., V:]  # U~ [..., L, V], W [..., L, K]
    P = gated_scores(q, k, gi, gi, strict=False, sub=sub)
    kd = _mul(k, to_end)
    return Affine(o=jnp.einsum("...ij,...jv->...iv", P, Ut),
                  q_eff=_mul(q, to_step) - jnp.einsum("...ij,...jk->...ik", P, W),
                  decay=None,
                  M=_eye_decay(across, K, q.dtype) - jnp.einsum("...jk,...jl->...kl", kd, W),
                  U=jnp.einsum("...jk,...jv->...kv", kd, Ut))


def rwkv7_block(r, w, k, v, a, b, *, sub=None):
    """RWKV-7's generalized delta rule, ``S_t = diag(exp w_t) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t``.

    ``o_t = r_t S_t``. The low-rank term reads the state before step t: with
    ``x_t = a_t S_{t-1}`` (``[V]``) the state is a per-key-decayed linear attention
    with keys ``b`` (values ``x``) and ``k`` (values ``v``),
    ``S_t = Gamma_{t<-0} S_0 + sum_{j<=t} Gamma_{t<-j} (b_j^T x_j + k_j^T v_j)``, and
    the ``x`` solve the unit lower-triangular system (scores with the exclusive gate)::

        (I - A_ab) X = A_ak V + (a exp(b_{t-1})) S_0,   A_ab_ij = a_i Gamma_{i-1<-j} b_j^T (j < i)

    so with ``T = (I - A_ab)^{-1}``: ``X = X~ + Wx S_0``, ``X~ = T A_ak V``,
    ``Wx = T (a exp(b_{t-1}))``, and with inclusive scores ``Q_b``, ``Q_k`` of ``r``::

        o   = Q_b X~ + Q_k V + (r exp(b) + Q_b Wx) S_0
        S_L = Bd^T X~ + Kd^T V + (diag(exp(b_L)) + Bd^T Wx) S_0     (Bd = b exp(b_L - b), Kd alike)
    """
    gi, ge = cum_gate(w, sub != FACTORED)
    Aab = gated_scores(a, b, ge, gi, strict=True, sub=sub)
    Aak = gated_scores(a, k, ge, gi, strict=True, sub=sub)
    rhs = jnp.concatenate([jnp.einsum("...ij,...jv->...iv", Aak, v),
                           a * exp_if(ge.b, ge.r == 0)], axis=-1)
    X = jnp.einsum("...ij,...jd->...id", unit_lower_inverse(-Aab), rhs)
    V, K = v.shape[-1], k.shape[-1]
    Xt, Wx = X[..., :V], X[..., V:]
    Qb = gated_scores(r, b, gi, gi, strict=False, sub=sub)
    Qk = gated_scores(r, k, gi, gi, strict=False, sub=sub)
    to_step, to_end, across = boundary_decays(gi)
    bd, kd = b * to_end, k * to_end
    return Affine(
        o=jnp.einsum("...ij,...jv->...iv", Qb, Xt) + jnp.einsum("...ij,...jv->...iv", Qk, v),
        q_eff=r * to_step + jnp.einsum("...ij,...jk->...ik", Qb, Wx),
        decay=None,
        M=_eye_decay(across, K, r.dtype) + jnp.einsum("...jk,...jl->...kl", bd, Wx),
        U=jnp.einsum("...jk,...jv->...kv", bd, Xt) + jnp.einsum("...jk,...jv->...kv", kd, v))
