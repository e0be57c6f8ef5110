"""Exact softmax attention: the reference, a blockwise flash form, and cuDNN.

One signature for every form (``impl``)::

    attention(q, k, v, *, causal=True, scale=None, window=None,
              segment_ids=None, impl="auto") -> o

Layouts (as ``jax.nn.dot_product_attention``)::

    q [B, T, Hq, D]     k, v [B, S, Hkv, D]     o [B, T, Hq, D]
    segment_ids [B, T] int (requires T == S); tokens attend only within an id.

GQA / MQA: ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``
(the grouping of ``jax.nn.dot_product_attention``). K/V are never repeated:
queries are reshaped to ``[B, Hkv, G, T, D]`` and every einsum carries the group
axis ``g``.

Masking, with query ``i`` at position ``i + (S - T)`` (bottom-right aligned when
``S > T``, the FlashAttention >= 2.1 convention, so the last query is the last
key) and key ``j`` at position ``j``:

* ``causal``: key position <= query position;
* ``window=W``: query ``t`` sees keys ``t-W+1 .. t`` (and, when not causal, also
  ``t+1 .. t+W-1``: a symmetric band);
* ``segment_ids``: equal ids only.

A query that sees no key at all returns zeros (no NaN).

Forms:

* ``impl="xla"``: :func:`reference_attention`, plain ``jnp`` that materialises
  the ``[T, S]`` scores: the readable definition the others are tested against.
* ``impl="flash"``: :func:`flash_attention`, blockwise online softmax in pure
  JAX (FlashAttention-2, Dao 2023, Algorithm 1) with a ``jax.custom_vjp`` that
  saves only ``o`` and the log-sum-exp and recomputes score blocks in the
  backward pass. Blocks above the causal diagonal or outside the window are never
  visited (the inner loops have data-dependent bounds). Scratch memory is
  ``O(block_q * block_k)`` per head instead of ``O(T * S)``.
* ``impl="cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``
  (GPU, float16/bfloat16, no ``segment_ids``).
* ``impl="splash"``: the Pallas TPU splash-attention kernels JAX ships
  (:mod:`longctx.kernels.splash_attention`; TPU only, wrapped in ``shard_map``
  under a multi-device mesh because GSPMD cannot partition a Pallas call).
* ``impl="auto"``: splash on TPU; on GPU cuDNN where the call is supported; else
  flash when the keys span more than one block, else the reference. The choice
  is logged once. (On TPU ``block_q`` / ``block_k`` are rounded up to multiples
  of 128 for splash; an explicit ``impl="splash"`` requires them.)
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from longctx import targets
from longctx.backends.full.config import IMPLS  # auto | xla | flash | cudnn | splash
from longctx.kernels import splash_attention as splash

log = logging.getLogger(__name__)

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


# ----------------------------------------------------------------------------
# Masking: one definition shared by every form.
# ----------------------------------------------------------------------------


def visible(q_pos, k_pos, *, causal, window, q_seg=None, k_seg=None, kv_len=None):
    """Boolean mask: may a query at ``q_pos`` read a key at ``k_pos``?

    ``q_pos [..., Tq, 1]`` and ``k_pos [..., 1, Tk]`` broadcast against each other
    (and ``q_seg``/``k_seg`` likewise). ``kv_len`` masks padded keys.
    """
    ok = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=bool)
    if causal:
        ok &= k_pos <= q_pos
    if window is not None:
        ok &= q_pos - k_pos < window
        if not causal:
            ok &= k_pos - q_pos < window
    if kv_len is not None:
        ok &= k_pos < kv_len
    if q_seg is not None:
        ok &= q_seg == k_seg
    return ok


def _check(q, k, v, causal, window, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects [batch, time, heads, head_dim] arrays; got "
            f"{q.shape=} {k.shape=} {v.shape=}")
    B, T, Hq, D = q.shape
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on [B, S, Hkv]; got {k.shape=} {v.shape=}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q and k must agree on batch and head_dim; got {q.shape=} {k.shape=}")
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads must be a multiple of kv heads (GQA); got {Hq=} {Hkv=}")
    S = k.shape[1]
    if S < T:
        raise ValueError(f"need at least as many keys as queries; got {T=} {S=}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive int or None; got {window=}")
    if segment_ids is not None:
        if T != S:
            raise ValueError(f"segment_ids need T == S; got {T=} {S=}")
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must be [B, T] = {(B, T)}; got {segment_ids.shape}")


def _grouped(q, hkv):
    """[B, T, Hq, D] -> [B, Hkv, G, T, D]."""
    B, T, Hq, D = q.shape
    return q.reshape(B, T, hkv, Hq // hkv, D).transpose(0, 2, 3, 1, 4)


def _ungrouped(o):
    """[B, Hkv, G, T, D] -> [B, T, Hq, D]."""
    B, Hkv, G, T, D = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, D)


def _safe_softmax_stats(s):
    """Row max that is 0 (not -inf) for rows with no visible key."""
    m = jnp.max(s, axis=-1)
    return jnp.where(jnp.isfinite(m), m, 0.0)


# ----------------------------------------------------------------------------
# The reference (impl="xla").
# ----------------------------------------------------------------------------


def masked_attention(q, k, v, mask, *, scale=None):
    """softmax(q k^T * scale) v under an explicit boolean ``mask``.

    ``q [B, T, Hq, D]``, ``k, v [B, S, Hkv, D]``, ``mask`` broadcastable to
    ``[B, Hkv, G, T, S]`` (True = visible). Materialises the scores: the
    reference, and the KV-cache path of decoding (one query, memory bound).
    """
    D, Hkv = q.shape[-1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qg = _grouped(q, Hkv)  # [B, K, G, T, D]
    s = jnp.einsum("bkgtd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp(s - _safe_softmax_stats(s)[..., None])
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    o = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return _ungrouped(o).astype(q.dtype)


def reference_attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None):
    """softmax(q k^T * scale) v with the full [T, S] score matrix. See module doc."""
    _check(q, k, v, causal, window, segment_ids)
    T, S = q.shape[1], k.shape[1]
    q_pos = (jnp.arange(T) + (S - T))[:, None]
    k_pos = jnp.arange(S)[None, :]
    seg_q = seg_k = None
    if segment_ids is not None:
        seg_q = segment_ids[:, None, None, :, None]
        seg_k = segment_ids[:, None, None, None, :]
    mask = visible(q_pos, k_pos, causal=causal, window=window, q_seg=seg_q, k_seg=seg_k)
    return masked_attention(q, k, v, mask, scale=scale)


# ----------------------------------------------------------------------------
# Flash attention (impl="flash"): blockwise online softmax + custom VJP.
# ----------------------------------------------------------------------------


class _Static(NamedTuple):
    """Hashable static configuration of one flash call."""

    causal: bool
    window: int | None
    scale: float
    T: int  # true (unpadded) query length
    S: int  # true (unpadded) key length
    block_q: int
    block_k: int


def _round_up(n, m):
    return -(-n // m) * m


def _kv_block_range(i, c: _Static, n_k):
    """Key blocks [lo, hi) that query block ``i`` can see (conservative)."""
    off = c.S - c.T
    first_q = i * c.block_q + off
    last_q = first_q + c.block_q - 1
    k_min = first_q - c.window + 1 if c.window is not None else 0
    if c.causal:
        k_max = last_q
    elif c.window is not None:
        k_max = last_q + c.window - 1
    else:
        k_max = c.S - 1
    lo = jnp.maximum(k_min, 0) // c.block_k
    hi = jnp.minimum(jnp.minimum(k_max, c.S - 1) // c.block_k + 1, n_k)
    return lo, jnp.maximum(hi, lo)


def _q_block_range(j, c: _Static, n_q):
    """Query blocks [lo, hi) that can see key block ``j`` (conservative)."""
    off = c.S - c.T
    first_k = j * c.block_k
    last_k = first_k + c.block_k - 1
    if c.causal:
        q_min = first_k
    elif c.window is not None:
        q_min = first_k - c.window + 1
    else:
        q_min = 0
    q_max = last_k + c.window - 1 if c.window is not None else c.T - 1 + off
    lo = jnp.maximum(q_min - off, 0) // c.block_q
    hi = jnp.minimum(jnp.maximum(q_max - off, -1) // c.block_q + 1, n_q)
    return lo, jnp.maximum(hi, lo)


def _block_mask(c: _Static, G, i, j, qseg, kseg):
    """Mask of query block i (``G * block_q`` grouped rows) against key block j.

    Returns a bool array broadcastable to ``[B, K, G*bq, bk]``; row ``r`` of the
    block is query ``i*bq + r // G`` (see :func:`_rows`).
    """
    off = c.S - c.T
    q_idx = i * c.block_q + jnp.arange(c.block_q * G) // G
    q_pos = (q_idx + off)[:, None]
    k_pos = (j * c.block_k + jnp.arange(c.block_k))[None, :]
    seg_q = seg_k = None
    if qseg is not None:
        seg_q = jnp.repeat(_slice(qseg, i, c.block_q, 1), G, axis=1)[:, None, :, None]
        seg_k = _slice(kseg, j, c.block_k, 1)[:, None, None, :]
    kv_len = c.S if c.S % c.block_k else None
    return visible(q_pos, k_pos, causal=c.causal, window=c.window,
                   q_seg=seg_q, k_seg=seg_k, kv_len=kv_len)


def _block_fully_visible(c: _Static, i, j, has_segments):
    """True when every (query, key) pair of block (i, j) is visible: no mask needed.

    Interior blocks are the vast majority at long lengths; skipping their mask
    saves several elementwise passes over each [rows, bk] score block.
    """
    if has_segments:
        return jnp.asarray(False)
    off = c.S - c.T
    first_q, last_q = i * c.block_q + off, i * c.block_q + off + c.block_q - 1
    first_k, last_k = j * c.block_k, j * c.block_k + c.block_k - 1
    ok = jnp.asarray(last_k < c.S)
    if c.causal:
        ok &= last_k <= first_q
    if c.window is not None:
        ok &= last_q - first_k < c.window
        if not c.causal:
            ok &= last_k - first_q < c.window
    return ok


def _masked_scores(c: _Static, G, i, j, qseg, kseg, s, transpose=False):
    """``s * scale`` with invisible entries at -inf (mask skipped on interior blocks)."""

    def masked(s):
        mask = _block_mask(c, G, i, j, qseg, kseg)
        return jnp.where(jnp.swapaxes(mask, -1, -2) if transpose else mask, s * c.scale, -jnp.inf)

    return jax.lax.cond(_block_fully_visible(c, i, j, qseg is not None),
                        lambda s: s * c.scale, masked, s)


def _slice(x, idx, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, idx * size, size, axis=axis)


def _flash_fwd_impl(c: _Static, G, q, k, v, qseg, kseg):
    """q [B,K,Tp*G,D] grouped rows, k/v [B,K,Sp,D] -> o like q, lse [B,K,Tp*G] f32."""
    B, K, R, D = q.shape
    rows = c.block_q * G  # query rows per block: GQA groups ride along as extra rows
    n_q, n_k = R // rows, k.shape[2] // c.block_k

    def q_block(i):
        qi = _slice(q, i, rows, 2)  # [B,K,r,D]

        def kv_step(j, carry):
            m, l, acc = carry
            kj, vj = _slice(k, j, c.block_k, 2), _slice(v, j, c.block_k, 2)  # [B,K,s,D]
            s = jnp.einsum("bkrd,bksd->bkrs", qi, kj, preferred_element_type=jnp.float32)
            s = _masked_scores(c, G, i, j, qseg, kseg, s)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), vj,
                            preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((B, K, rows), -jnp.inf, jnp.float32),
                jnp.zeros((B, K, rows), jnp.float32),
                jnp.zeros((B, K, rows, D), jnp.float32))
        lo, hi = _kv_block_range(i, c, n_k)
        m, l, acc = jax.lax.fori_loop(lo, hi, kv_step, init)
        o = acc / jnp.where(l == 0, 1.0, l)[..., None]
        # A query with no visible key: o = 0 and lse = +inf, so exp(s - lse) = 0 in bwd.
        lse = jnp.where(l == 0, jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l))
        return o.astype(q.dtype), lse

    o, lse = jax.lax.map(q_block, jnp.arange(n_q))  # [n_q, B,K,r,(D)]
    o = jnp.moveaxis(o, 0, 2).reshape(B, K, R, D)
    lse = jnp.moveaxis(lse, 0, 2).reshape(B, K, R)
    return o, lse


def _flash_bwd_impl(c: _Static, G, q, k, v, qseg, kseg, o, lse, do):
    """One pass over key blocks; dq accumulated in place (no atomics needed on XLA).

    Scores are computed transposed (``[keys, rows]``) so that dv = P^T dO and
    dk = dS^T Q are plain matmuls without materialised transposes.
    """
    B, K, R, D = q.shape
    Sp = k.shape[2]
    rows = c.block_q * G
    n_q, n_k = R // rows, Sp // c.block_k
    # delta_i = rowsum(dO_i * O_i) (FlashAttention-2, Algorithm 2, line 4).
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B,K,R]

    def kv_block(dq, j):
        kj, vj = _slice(k, j, c.block_k, 2), _slice(v, j, c.block_k, 2)  # [B,K,s,D]

        def q_step(i, carry):
            dq, dk, dv = carry
            qi, doi = _slice(q, i, rows, 2), _slice(do, i, rows, 2)  # [B,K,r,D]
            lse_i, delta_i = _slice(lse, i, rows, 2), _slice(delta, i, rows, 2)  # [B,K,r]
            st = jnp.einsum("bksd,bkrd->bksr", kj, qi, preferred_element_type=jnp.float32)
            st = _masked_scores(c, G, i, j, qseg, kseg, st, transpose=True)
            pt = jnp.exp(st - lse_i[:, :, None, :])  # [B,K,s,r]
            dv = dv + jnp.einsum("bksr,bkrd->bksd", pt.astype(do.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dpt = jnp.einsum("bksd,bkrd->bksr", vj, doi, preferred_element_type=jnp.float32)
            dst = (pt * (dpt - delta_i[:, :, None, :]) * c.scale).astype(q.dtype)
            dk = dk + jnp.einsum("bksr,bkrd->bksd", dst, qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("bksr,bksd->bkrd", dst, kj, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, _slice(dq, i, rows, 2) + dqi, i * rows, axis=2)
            return dq, dk, dv

        zeros = jnp.zeros((B, K, c.block_k, D), jnp.float32)
        lo, hi = _q_block_range(j, c, n_q)
        dq, dk, dv = jax.lax.fori_loop(lo, hi, q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros((B, K, R, D), jnp.float32)
    dq, (dk, dv) = jax.lax.scan(kv_block, dq0, jnp.arange(n_k))  # dk: [n_k, B,K,s,D]
    dk = jnp.moveaxis(dk, 0, 2).reshape(B, K, Sp, D)
    dv = jnp.moveaxis(dv, 0, 2).reshape(B, K, Sp, D)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(c: _Static, G: int, q, k, v, qseg, kseg):
    return _flash_fwd_impl(c, G, q, k, v, qseg, kseg)[0]


def _flash_fwd(c, G, q, k, v, qseg, kseg):
    o, lse = _flash_fwd_impl(c, G, q, k, v, qseg, kseg)
    # Residuals: the inputs, o and lse only -- no [T, S] matrix is kept.
    return o, (q, k, v, qseg, kseg, o, lse)


def _flash_bwd(c, G, res, do):
    q, k, v, qseg, kseg, o, lse = res
    dq, dk, dv = _flash_bwd_impl(c, G, q, k, v, qseg, kseg, o, lse, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None,
                    block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """Blockwise exact attention with O(block) memory; same contract as the reference."""
    _check(q, k, v, causal, window, segment_ids)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive; got {block_q=} {block_k=}")
    # Short inputs get one block, rounded to 8 rows, rather than a huge padded one.
    block_q, block_k = min(block_q, _round_up(T, 8)), min(block_k, _round_up(S, 8))
    c = _Static(causal=bool(causal), window=None if window is None else int(window),
                scale=float(D**-0.5 if scale is None else scale), T=T, S=S,
                block_q=block_q, block_k=block_k)
    Tp, Sp = _round_up(T, block_q), _round_up(S, block_k)
    G = Hq // Hkv
    # [B, T, Hq, D] -> [B, Hkv, Tp * G, D]: row t*G + g is query t of group member g.
    qr = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 1, 3, 4)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, Tp - T), (0, 0), (0, 0))).reshape(B, Hkv, Tp * G, D)
    kt = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    vt = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    qseg = kseg = None
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        # Padded queries get -1, padded keys -2: they never match anything real.
        qseg = jnp.pad(segment_ids, ((0, 0), (0, Tp - T)), constant_values=-1)
        kseg = jnp.pad(segment_ids, ((0, 0), (0, Sp - S)), constant_values=-2)
    o = _flash(c, G, qr, kt, vt, qseg, kseg)  # [B, Hkv, Tp * G, D]
    o = o.reshape(B, Hkv, Tp, G, D)[:, :, :T].transpose(0, 2, 1, 3, 4)
    return o.reshape(B, T, Hq, D)


# ----------------------------------------------------------------------------
# cuDNN and dispatch.
# ----------------------------------------------------------------------------


def cudnn_attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None):
    """``jax.nn.dot_product_attention(implementation="cudnn")``; raises where unsupported."""
    _check(q, k, v, causal, window, segment_ids)
    if targets.platform() != "gpu":
        raise ValueError(f"impl='cudnn' needs a GPU; the target platform is "
                         f"{targets.platform()!r} (use impl='flash' or 'auto')")
    if segment_ids is not None:
        raise ValueError("impl='cudnn' does not take segment_ids here; use impl='flash'")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"impl='cudnn' needs T == S; got {q.shape[1]=} {k.shape[1]=}")
    local = None
    if window is not None:
        local = (window - 1, 0 if causal else window - 1)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        local_window_size=local, implementation="cudnn")


_LOGGED: set = set()


def _log_once(msg):
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info(msg)


def _cudnn_possible(q, segment_ids):
    return (targets.platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and segment_ids is None)


def attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None,
              impl="auto", block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """Exact softmax attention ``softmax(q k^T * scale) v``; see the module docstring."""
    kw = dict(causal=causal, scale=scale, window=window, segment_ids=segment_ids)
    if impl == "xla":
        return reference_attention(q, k, v, **kw)
    if impl == "flash":
        return flash_attention(q, k, v, **kw, block_q=block_q, block_k=block_k)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, **kw)
    if impl == "splash":
        return splash.splash_attention(q, k, v, **kw, block_q=block_q, block_k=block_k)
    if impl != "auto":
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    if splash.available():
        _log_once("attention impl=auto chose splash (TPU)")
        lanes = splash.LANES
        return splash.splash_attention(q, k, v, **kw, block_q=_round_up(block_q, lanes),
                                       block_k=_round_up(block_k, lanes))
    if _cudnn_possible(q, segment_ids) and q.shape[1] == k.shape[1]:
        try:
            out = cudnn_attention(q, k, v, **kw)
            _log_once("attention impl=auto chose cudnn")
            return out
        except Exception as e:  # noqa: BLE001 -- the reason is logged, not hidden
            _log_once(f"attention impl=auto: cudnn unsupported here ({e}); using flash")
    if k.shape[1] > block_k:
        _log_once(f"attention impl=auto chose flash on {targets.platform()}")
        return flash_attention(q, k, v, **kw, block_q=block_q, block_k=block_k)
    _log_once(f"attention impl=auto chose xla (keys fit one {block_k=} block)")
    return reference_attention(q, k, v, **kw)
