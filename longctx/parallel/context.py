"""Context parallelism: one sequence split over the mesh axis ``sequence``.

Exact attention (ring / all-gather) and sequence-parallel linear attention
(state passing) on global arrays sharded along time::

    attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None,
              strategy="ring", load_balance=True, axis="sequence") -> o
    linear_attention(q, k, v, *, g=None, ...) / delta_rule(q, k, v, beta, *, g=None, ...)
        -> (o, final_state)                       (see longctx.parallel.context_linear)

Layouts as :func:`longctx.backends.full.ops.attention`: ``q [B, T, Hq, D]``,
``k, v [B, T, Hkv, D]``, ``segment_ids [B, T]``; the current mesh is the one of
``jax.set_mesh``. Inside, one ``jax.shard_map`` that is manual over ``axis``
only (batch / heads keep whatever sharding GSPMD gave them).

Strategies (``N`` devices on ``axis``, ``Tl = T / N`` local tokens):

* ``"ring"``: the ``Hkv`` key/value heads (never the repeated GQA heads) rotate
  around the ring with ``lax.ppermute``; at each of the ``N`` steps every device
  runs the blockwise flash kernel of its local queries against the chunk it
  holds, and the partial results merge by their log-sum-exp. ``jax.custom_vjp``:
  the backward pass rotates K/V once more, the dK/dV accumulators travelling
  with them and arriving home after the ``N``-th hop; dQ stays local. Only
  ``o`` and the log-sum-exp are saved. Peak extra memory: the K/V (and, backward,
  dK/dV) chunk in flight. The backward attends to the local chunk first, outside the
  ring loop, and every chunk's gradients accumulate in place into the travelling
  dK/dV (no zero-initialised loop carry: XLA allocates a loop's initial carry early, so
  such ``[T/N]`` buffers would stay live through the whole forward); block positions come
  from the chunks' start positions (:func:`local_chunk_starts`), never ``[T/N]`` position vectors.
* ``"all_gather"``: K/V (and segment ids) all-gathered once, local queries
  attend to all of it; the backward pass reduce-scatters dK/dV (the transpose
  of the all-gather). Simpler and fewer, larger messages: better for short
  sequences and GQA with few KV heads; memory ``O(T)`` K/V per device.

Both visit ``(query block, key block)`` pairs only when some pair of their tokens
is visible under the causal mask / window, judged from the blocks' global
positions (:func:`blocks_meet`); invisible blocks are skipped by ``lax.cond``, not
computed. Segment ids are masked inside a block.

Load balance (``load_balance=True``, causal attention): the sequence is cut into
``2N`` chunks and device ``i`` holds chunks ``i`` and ``2N - 1 - i`` ("zigzag",
the dual chunk swap of Striped / Llama-3 context parallelism): every device then
has the same number of visible key blocks (:func:`visited_key_blocks` counts
them). The public function takes and returns natural order and permutes inside;
a model that permutes its tokens once per forward passes ``inputs_permuted=True``
(:func:`zigzag` / :func:`unzigzag`: two ``ppermute``s of half a shard, never a
gather). ``T % 2N != 0`` is an error naming ``T``
and ``N``. Without load balance device ``i`` holds the contiguous chunk ``i``
(``T % N == 0`` required).

Paths that stay with GSPMD under a split sequence (``context_parallel=none``, a KV
cache or carried state: decoding, and models that scan ``model.segment_len`` segments)
are logged once (:func:`note_gspmd`); the recurrent backend refuses a split sequence.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from longctx.backends.full.ops import (DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, reference_attention,
                                       visible)

STRATEGIES = ("ring", "all_gather")
log = logging.getLogger(__name__)
_NOTED: set = set()


# ----------------------------------------------------------------------------
# The mesh axis, the split and the zigzag permutation.
# ----------------------------------------------------------------------------


def axis_size(axis: str = "sequence") -> int:
    """Size of mesh axis ``axis`` of the current mesh (1 when there is none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return 1
    return int(mesh.shape[axis])


def active_strategy(context_parallel: str, axis: str = "sequence") -> str | None:
    """The strategy a layer runs under the current mesh (``model.attention.context_parallel``):
    None for ``"none"`` or when the mesh does not split ``axis``; ``"auto"`` is ring."""
    if context_parallel == "none" or axis_size(axis) <= 1:
        return None
    return "ring" if context_parallel == "auto" else context_parallel


def note_gspmd(layer: str, why: str, axis: str = "sequence") -> None:
    """Log once (a warning) that ``layer`` runs its token mixing under GSPMD although the
    current mesh splits ``axis``: no ring / state passing, GSPMD gathers what it needs.

    The paths: ``context_parallel=none``; a KV cache or carried state (decoding, and a
    model that scans segments, ``model.segment_len``: each segment's mixer gets the state
    of the segments before it, so the mixer runs the single-device form on the segment,
    split over ``axis`` as GSPMD sees fit). Silent when the mesh does not split ``axis``.
    """
    n = axis_size(axis)
    if n <= 1 or (layer, why) in _NOTED:
        return
    _NOTED.add((layer, why))
    log.warning("%s: mesh axis %r splits the sequence %d ways but %s: this layer's token "
                "mixing is left to GSPMD (no context parallelism)", layer, axis, n, why)


def check_split(T: int, n: int, load_balance: bool) -> None:
    parts = 2 * n if load_balance else n
    if T % parts:
        how = f"2N = {parts} zigzag chunks" if load_balance else f"N = {n} contiguous chunks"
        raise ValueError(f"context parallelism cannot split T={T} tokens over N={n} devices "
                         f"of the sequence axis: T must be a multiple of {how}")


def zigzag_indices(T: int, n: int) -> np.ndarray:
    """``perm [T]``: position ``j`` of the zigzag order holds natural token ``perm[j]``.

    Device ``i`` (its ``T / N`` contiguous slots) holds chunks ``i`` and ``2N-1-i``
    (``2N-1-i`` first on odd devices).
    """
    check_split(T, n, True)
    C = T // (2 * n)
    return np.concatenate([np.arange(c * C, (c + 1) * C) for c in _chunks(n)])


def _chunks(n):
    """Chunk order of the zigzag layout: device ``i`` holds ``(i, 2N-1-i)``, swapped on odd
    devices (``(2N-1-i, i)``) so that each of the two ppermutes fills one fixed slot."""
    return [c for i in range(n) for c in ((i, 2 * n - 1 - i) if i % 2 == 0
                                          else (2 * n - 1 - i, i))]


def zigzag_reference(x, n: int, axis: int = 1):
    """Natural -> zigzag order along ``axis`` by static slices (readable; GSPMD gathers)."""
    T = x.shape[axis]
    check_split(T, n, True)
    C = T // (2 * n)
    parts = [jax.lax.slice_in_dim(x, c * C, (c + 1) * C, axis=axis) for c in _chunks(n)]
    return jnp.concatenate(parts, axis=axis)


def _zigzag_perms(n):
    """Two ``ppermute`` pairs: device ``d`` sends chunk ``2d`` (perm A) and ``2d+1`` (perm B)
    of its contiguous half-chunks to the device that holds it in zigzag order."""
    home = lambda c: c if c < n else 2 * n - 1 - c  # noqa: E731
    return [(d, home(2 * d)) for d in range(n)], [(d, home(2 * d + 1)) for d in range(n)]


def _local_zigzag(x, n, axis_name, t_axis=1, inverse=False):
    """Inside shard_map over ``axis_name``: this device's contiguous tokens <-> its zigzag
    tokens, two ``ppermute``s of half a shard each (no gather of the sequence).

    Perm A carries the even chunks, which are slot 0 of every device in the zigzag
    layout (:func:`_chunks`), perm B the odd chunks (slot 1).
    """
    perm_a, perm_b = _zigzag_perms(n)
    if inverse:
        perm_a, perm_b = [(b, a) for a, b in perm_a], [(b, a) for a, b in perm_b]
    h0, h1 = jnp.split(x, 2, axis=t_axis)
    a = jax.lax.ppermute(h0, axis_name, perm_a)
    b = jax.lax.ppermute(h1, axis_name, perm_b)
    return jnp.concatenate([a, b], axis=t_axis)


def _sharded_zigzag(x, axis, inverse):
    n = axis_size(axis)
    check_split(x.shape[1], n, True)
    spec = P(None, axis)
    f = jax.shard_map(lambda x: _local_zigzag(x, n, axis, inverse=inverse), in_specs=spec,
                      out_specs=spec, axis_names=frozenset({axis}), check_vma=False)
    return f(x)


def zigzag(x, axis: str = "sequence"):
    """``x [B, T, ...]`` sharded over mesh axis ``axis`` (N devices): natural -> zigzag order
    (equal to :func:`zigzag_reference`), moving half a shard per device, twice."""
    return _sharded_zigzag(x, axis, False)


def unzigzag(x, axis: str = "sequence"):
    """Zigzag -> natural order along time (inverse of :func:`zigzag`)."""
    return _sharded_zigzag(x, axis, True)


def local_positions(idx, T: int, n: int, load_balance: bool):
    """Global token indices ``[T / N]`` int32 of the tokens device ``idx`` holds
    (zigzag: chunks ``i`` and ``2N-1-i``, in the order of :func:`_chunks`)."""
    Tl = T // n
    if not load_balance:
        return idx * Tl + jnp.arange(Tl, dtype=jnp.int32)
    C = Tl // 2
    r = jnp.arange(C, dtype=jnp.int32)
    lo, hi = idx, 2 * n - 1 - idx
    odd = idx % 2 == 1
    first, second = jnp.where(odd, hi, lo), jnp.where(odd, lo, hi)
    return jnp.concatenate([first * C + r, second * C + r])


def local_chunk_starts(idx, T: int, n: int, load_balance: bool):
    """Global position of the first token of each chunk device ``idx`` holds: ``[2]``
    (zigzag) or ``[1]`` int32. :func:`local_positions` is ``starts[u // P] + u % P`` for
    slot ``u`` and chunk length ``P``; the kernels derive a block's positions from it
    (blocks never straddle a chunk) instead of holding ``[T / N]`` position vectors."""
    Tl = T // n
    if not load_balance:
        return (idx * Tl)[None].astype(jnp.int32)
    C = Tl // 2
    lo, hi = idx, 2 * n - 1 - idx
    odd = idx % 2 == 1
    return (jnp.stack([jnp.where(odd, hi, lo), jnp.where(odd, lo, hi)]) * C).astype(jnp.int32)


def _block_pos(c, starts, i, b):
    """Global positions ``[b]`` of block ``i`` (size ``b``) of a layout with chunk starts
    ``starts`` (one per chunk of ``c.part`` tokens, concatenated over devices for a gather)."""
    u = i * b
    return starts[u // c.part] + u % c.part + jnp.arange(b, dtype=jnp.int32)


# ----------------------------------------------------------------------------
# Block kernel with explicit global positions (the flash kernel of
# longctx.backends.full.ops, generalised from "query i sits at i" to any positions).
# ----------------------------------------------------------------------------


class _Static(NamedTuple):
    causal: bool
    window: int | None
    scale: float
    G: int  # query heads per kv head: grouped rows ride along as extra rows
    bq: int
    bk: int
    n: int  # devices on the axis
    axis: str
    load_balance: bool
    T: int  # global length
    part: int  # chunk length: blocks never straddle two chunks


def blocks_meet(causal, window, q_lo, q_hi, k_lo, k_hi):
    """Can any query in positions ``[q_lo, q_hi]`` see any key in ``[k_lo, k_hi]``?"""
    ok = jnp.asarray(True)
    if causal:
        ok &= k_lo <= q_hi
    if window is not None:
        ok &= q_lo - k_hi < window
        if not causal:
            ok &= k_lo - q_hi < window
    return ok


def _largest_divisor(n, cap):
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _sl(x, i, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _mask(c: _Static, qp, kp, qs, ks):
    """Mask ``[B|1, 1, G*bq, bk]`` of query positions ``qp [bq]`` against keys ``kp [bk]``."""
    qrow = jnp.repeat(qp, c.G)[:, None]  # row r is query r // G
    seg_q = seg_k = None
    if qs is not None:
        seg_q = jnp.repeat(qs, c.G, axis=1)[:, None, :, None]
        seg_k = ks[:, None, None, :]
    return visible(qrow, kp[None, :], causal=c.causal, window=c.window, q_seg=seg_q, k_seg=seg_k)


def _fwd_chunk(c: _Static, q, k, v, qpos, kpos, qseg, kseg, o0=None, lse0=None):
    """Local queries against one K/V chunk, merged into a running result.

    ``q [B, K, Tq*G, D]`` grouped rows, ``k, v [B, K, S, D]``, ``qpos, kpos``: chunk starts
    (:func:`local_chunk_starts`) of the queries and keys,
    ``qseg [B, Tq]``, ``kseg [B, S]`` (or None) -> ``o [B, K, Tq*G, D]`` float32 (normalised)
    and ``lse [B, K, Tq*G]`` float32 (``-inf`` for a row that sees no key). ``o0, lse0``: the
    result over the keys seen so far (ring steps before), merged by log-sum-exp: the online
    softmax starts from ``m = lse0, l = 1, acc = o0``. The buffers are updated block by
    block in place (no stacked copy of ``o``).
    """
    B, K, R, D = q.shape
    rows = c.bq * c.G
    n_q, n_k = R // rows, k.shape[2] // c.bk

    def q_block(i, out):
        o_all, lse_all = out
        qi = _sl(q, i, rows, 2)
        qp = _block_pos(c, qpos, i, c.bq)
        qs = None if qseg is None else _sl(qseg, i, c.bq, 1)

        def kv_step(j, carry):
            kp = _block_pos(c, kpos, j, c.bk)

            def compute(carry):
                m, l, acc = carry
                kj, vj = _sl(k, j, c.bk, 2), _sl(v, j, c.bk, 2)
                ks = None if kseg is None else _sl(kseg, j, c.bk, 1)
                s = jnp.einsum("bkrd,bksd->bkrs", qi, kj, preferred_element_type=jnp.float32)
                s = jnp.where(_mask(c, qp, kp, qs, ks), s * c.scale, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                corr = jnp.exp(m - m_safe)
                pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), vj,
                                preferred_element_type=jnp.float32)
                return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

            meet = blocks_meet(c.causal, c.window, qp[0], qp[-1], kp[0], kp[-1])
            return jax.lax.cond(meet, compute, lambda x: x, carry)

        lse_i = _sl(lse_all, i, rows, 2)
        init = (lse_i, jnp.isfinite(lse_i).astype(jnp.float32), _sl(o_all, i, rows, 2))
        m, l, acc = jax.lax.fori_loop(0, n_k, kv_step, init)
        o = acc / jnp.where(l == 0, 1.0, l)[..., None]
        lse = jnp.where(l == 0, -jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(l))
        return (jax.lax.dynamic_update_slice_in_dim(o_all, o, i * rows, axis=2),
                jax.lax.dynamic_update_slice_in_dim(lse_all, lse, i * rows, axis=2))

    if o0 is None:
        o0 = jnp.zeros((B, K, R, D), jnp.float32)
        lse0 = jnp.full((B, K, R), -jnp.inf, jnp.float32)
    return jax.lax.fori_loop(0, n_q, q_block, (o0, lse0))


def _bwd_chunk(c: _Static, q, k, v, qpos, kpos, qseg, kseg, lse, delta, do, dq, dk, dv):
    """Gradients of the local queries against one chunk, given the *global* ``lse``
    (``+inf`` for empty rows) and ``delta = rowsum(dO * O)`` (FlashAttention-2, Alg. 2),
    accumulated in place, block by block, into ``dq [B, K, R, D]`` and the chunk's
    ``dk, dv [B, K, S, D]`` (all float32; zeros, or the ring's travelling accumulators).

    Accumulating into the buffers passed in (rather than returning this chunk's dK/dV
    stacked block by block, to be added to the accumulators) keeps one dK/dV buffer per
    chunk: no stacked ``[n_k, ..., bk, D]`` copy, no separate partial to add.
    """
    B, K, R, D = q.shape
    rows = c.bq * c.G
    n_q, n_k = R // rows, k.shape[2] // c.bk

    def kv_block(j, acc):
        dq, dk_all, dv_all = acc
        kj, vj = _sl(k, j, c.bk, 2), _sl(v, j, c.bk, 2)
        kp = _block_pos(c, kpos, j, c.bk)
        ks = None if kseg is None else _sl(kseg, j, c.bk, 1)

        def q_step(i, carry):
            qp = _block_pos(c, qpos, i, c.bq)

            def compute(carry):
                dq, dk, dv = carry
                qi, doi = _sl(q, i, rows, 2), _sl(do, i, rows, 2)
                lse_i, delta_i = _sl(lse, i, rows, 2), _sl(delta, i, rows, 2)
                qs = None if qseg is None else _sl(qseg, i, c.bq, 1)
                s = jnp.einsum("bkrd,bksd->bkrs", qi, kj, preferred_element_type=jnp.float32)
                s = jnp.where(_mask(c, qp, kp, qs, ks), s * c.scale, -jnp.inf)
                p = jnp.exp(s - lse_i[..., None])  # [B, K, r, s]
                dv = dv + jnp.einsum("bkrs,bkrd->bksd", p.astype(do.dtype), doi,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkrd,bksd->bkrs", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * c.scale).astype(q.dtype)
                dk = dk + jnp.einsum("bkrs,bkrd->bksd", ds, qi, preferred_element_type=jnp.float32)
                dqi = jnp.einsum("bkrs,bksd->bkrd", ds, kj, preferred_element_type=jnp.float32)
                dq = jax.lax.dynamic_update_slice_in_dim(dq, _sl(dq, i, rows, 2) + dqi,
                                                         i * rows, axis=2)
                return dq, dk, dv

            meet = blocks_meet(c.causal, c.window, qp[0], qp[-1], kp[0], kp[-1])
            return jax.lax.cond(meet, compute, lambda x: x, carry)

        dq, dk, dv = jax.lax.fori_loop(0, n_q, q_step,
                                       (dq, _sl(dk_all, j, c.bk, 2), _sl(dv_all, j, c.bk, 2)))
        return (dq, jax.lax.dynamic_update_slice_in_dim(dk_all, dk, j * c.bk, axis=2),
                jax.lax.dynamic_update_slice_in_dim(dv_all, dv, j * c.bk, axis=2))

    return jax.lax.fori_loop(0, n_k, kv_block, (dq, dk, dv))


def _bwd_lse(lse):
    # A row that sees nothing: lse = +inf, so exp(s - lse) = 0 in the backward pass.
    return jnp.where(jnp.isneginf(lse), jnp.inf, lse)


# ----------------------------------------------------------------------------
# Ring (inside shard_map): forward and backward written out, as nshepperd's
# flash_attn_jax ring_fwd / ring_bwd.
# ----------------------------------------------------------------------------


def _source_positions(c: _Static, s):
    """Chunk starts of the K/V chunk a device holds at ring step ``s``."""
    src = (jax.lax.axis_index(c.axis) - s) % c.n
    return local_chunk_starts(src, c.T, c.n, c.load_balance)


def _rotate(c: _Static, *xs):
    perm = [(i, (i + 1) % c.n) for i in range(c.n)]
    return tuple(None if x is None else jax.lax.ppermute(x, c.axis, perm) for x in xs)


def _ring_fwd_impl(c: _Static, q, k, v, qpos, qseg, kseg):
    B, K, R, D = q.shape

    def step(carry, s):  # attend to the chunk held, then pass it on
        o, lse, k, v, kseg = carry
        o, lse = _fwd_chunk(c, q, k, v, qpos, _source_positions(c, s), qseg, kseg, o, lse)
        k, v, kseg = _rotate(c, k, v, kseg)
        return (o, lse, k, v, kseg), None

    init = (jnp.zeros((B, K, R, D), jnp.float32), jnp.full((B, K, R), -jnp.inf, jnp.float32),
            k, v, kseg)
    # N - 1 steps that rotate, then the last chunk without a rotation after it.
    (o, lse, k, v, kseg), _ = jax.lax.scan(step, init, jnp.arange(c.n - 1))
    o, lse = _fwd_chunk(c, q, k, v, qpos, _source_positions(c, c.n - 1), qseg, kseg, o, lse)
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(c: _Static, q, k, v, qpos, qseg, kseg):
    return _ring_fwd_impl(c, q, k, v, qpos, qseg, kseg)[0]


def _ring_fwd(c, q, k, v, qpos, qseg, kseg):
    o, lse = _ring_fwd_impl(c, q, k, v, qpos, qseg, kseg)
    return o, (q, k, v, qpos, qseg, kseg, o, lse)


def _ring_bwd(c, res, do):
    q, k, v, qpos, qseg, kseg, o, lse = res
    lse = _bwd_lse(lse)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)

    def grads(s, k, v, kseg, dq, dk, dv):
        return _bwd_chunk(c, q, k, v, qpos, _source_positions(c, s), qseg, kseg, lse, delta, do,
                          dq, dk, dv)

    def step(carry, s):  # receive the next chunk with its dK/dV accumulators, add to them
        dq, k, v, kseg, dk, dv = carry
        k, v, kseg, dk, dv = _rotate(c, k, v, kseg, dk, dv)
        dq, dk, dv = grads(s, k, v, kseg, dq, dk, dv)
        return (dq, k, v, kseg, dk, dv), None

    # The local chunk first, outside the ring loop: its dK/dV start from zeros here, so
    # the loop carries no zero-initialised accumulators (XLA allocates a loop's initial
    # carry early, and such buffers would stay live through the whole forward pass).
    f32 = functools.partial(jnp.zeros, dtype=jnp.float32)
    dq, dk, dv = grads(0, k, v, kseg, f32(q.shape), f32(k.shape), f32(v.shape))
    (dq, k, v, kseg, dk, dv), _ = jax.lax.scan(step, (dq, k, v, kseg, dk, dv),
                                               jnp.arange(1, c.n))
    dk, dv = _rotate(c, dk, dv)  # the N-th hop: the accumulators arrive home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------
# All-gather: one local attention against every key; autodiff transposes the
# all-gather into a reduce-scatter of dK/dV.
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(c: _Static, q, k, v, qpos, kpos, qseg, kseg):
    o, _ = _fwd_chunk(c, q, k, v, qpos, kpos, qseg, kseg)
    return o.astype(q.dtype)


def _attend_fwd(c, q, k, v, qpos, kpos, qseg, kseg):
    o, lse = _fwd_chunk(c, q, k, v, qpos, kpos, qseg, kseg)
    o = o.astype(q.dtype)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _attend_bwd(c, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    f32 = functools.partial(jnp.zeros, dtype=jnp.float32)
    dq, dk, dv = _bwd_chunk(c, q, k, v, qpos, kpos, qseg, kseg, _bwd_lse(lse), delta, do,
                            f32(q.shape), f32(k.shape), f32(v.shape))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _all_gather_local(c: _Static, q, k, v, qpos, qseg, kseg):
    gather = functools.partial(jax.lax.all_gather, axis_name=c.axis, tiled=True)
    kg, vg = gather(k, axis=2), gather(v, axis=2)
    ksg = None if kseg is None else gather(kseg, axis=1)
    kpos = jnp.concatenate([local_chunk_starts(jnp.int32(d), c.T, c.n, c.load_balance)
                            for d in range(c.n)])
    return _attend(c, q, kg, vg, qpos, kpos, qseg, ksg)


# ----------------------------------------------------------------------------
# The public function.
# ----------------------------------------------------------------------------


def _check_args(q, k, v, *, causal, window, segment_ids):
    """The single-device op's own argument checks (its errors and messages), on shapes only:
    its public reference traced abstractly by ``jax.eval_shape``, nothing computed."""
    jax.eval_shape(functools.partial(reference_attention, causal=causal, window=window),
                   q, k, v, segment_ids=segment_ids)


def attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None,
              strategy="ring", load_balance=True, axis="sequence", inputs_permuted=False,
              block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K):
    """Exact attention of a sequence split over mesh axis ``axis``; see the module doc.

    ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]``, ``segment_ids [B, T]`` -> ``o [B, T, Hq, D]``,
    equal to ``longctx.backends.full.ops.attention`` on the same arguments.
    ``inputs_permuted=True`` (with ``load_balance``): the arrays are already in zigzag
    order and the result stays in it (the model permutes once per forward).
    """
    _check_args(q, k, v, causal=causal, window=window, segment_ids=segment_ids)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context-parallel {strategy=!r}; expected one of {STRATEGIES}")
    B, T, Hq, D = q.shape
    if k.shape[1] != T:
        raise ValueError(f"context-parallel attention needs as many keys as queries; got "
                         f"{T=} and {k.shape[1]=}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(f"context-parallel attention needs a current mesh with axis {axis!r} "
                         f"(jax.set_mesh); the current mesh has axes "
                         f"{() if mesh.empty else mesh.axis_names}")
    n = int(mesh.shape[axis])
    check_split(T, n, load_balance)
    if inputs_permuted and not load_balance:
        raise ValueError("inputs_permuted=True only makes sense with load_balance=True")
    Hkv = k.shape[2]
    Tl = T // n
    part = Tl // 2 if load_balance else Tl  # blocks never straddle two zigzag chunks
    c = _Static(causal=bool(causal), window=None if window is None else int(window),
                scale=float(D**-0.5 if scale is None else scale), G=Hq // Hkv,
                bq=_largest_divisor(part, block_q), bk=_largest_divisor(part, block_k),
                n=n, axis=axis, load_balance=bool(load_balance), T=T, part=part)
    permute = load_balance and not inputs_permuted
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)

    def local(q, k, v, seg):
        if permute:  # natural -> zigzag inside the shard_map: half a shard moves, twice
            q, k, v = (_local_zigzag(x, n, axis) for x in (q, k, v))
            seg = None if seg is None else _local_zigzag(seg, n, axis)
        # [B, Tl, Hq, D] -> [B, Hkv, Tl*G, D] (row t*G + g), k/v -> [B, Hkv, Tl, D]
        qr = q.reshape(B, Tl, Hkv, c.G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, Tl * c.G, D)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        qpos = local_chunk_starts(jax.lax.axis_index(axis), T, n, load_balance)
        run = _ring if strategy == "ring" else _all_gather_local
        o = run(c, qr, kt, vt, qpos, seg, seg)
        o = o.reshape(B, Hkv, Tl, c.G, D).transpose(0, 2, 1, 3, 4).reshape(B, Tl, Hq, D)
        return _local_zigzag(o, n, axis, inverse=True) if permute else o

    spec = P(None, axis)
    f = jax.shard_map(local, in_specs=(spec, spec, spec, None if seg is None else spec),
                      out_specs=spec, axis_names=frozenset({axis}), check_vma=False)
    return f(q, k, v, seg)


# ----------------------------------------------------------------------------
# Work balance: the key blocks each device visits (deterministic count).
# ----------------------------------------------------------------------------


def visited_key_blocks(T: int, n: int, *, causal=True, window=None, load_balance=True,
                       block: int = DEFAULT_BLOCK_Q) -> list[int]:
    """Per device, the number of (query block, key block) pairs the kernel computes.

    The same predicate (:func:`blocks_meet`) and the same block sizes as
    :func:`attention` (ring and all-gather visit the same pairs), in numpy.
    """
    check_split(T, n, load_balance)
    Tl = T // n
    b = _largest_divisor(Tl // 2 if load_balance else Tl, block)
    pos = [np.asarray(local_positions(d, T, n, load_balance)) for d in range(n)]
    allk = np.concatenate(pos)
    kb = allk.reshape(-1, b)
    counts = []
    for d in range(n):
        qb = pos[d].reshape(-1, b)
        counts.append(int(sum(bool(blocks_meet(causal, window, qi[0], qi[-1], kj[0], kj[-1]))
                              for qi in qb for kj in kb)))
    return counts


__all__ = ["STRATEGIES", "active_strategy", "attention", "axis_size", "check_split",
           "local_chunk_starts", "local_positions", "note_gspmd", "visited_key_blocks", "zigzag",
           "zigzag_indices", "zigzag_reference", "unzigzag"]
