"""The memories' math of the ``recurrent`` backend (no Flax): compressive memory
(Infini-attention), kNN retrieval (Memorizing Transformer), the ring buffers of
the XL cache and kNN store, and the visibility of memory tokens (RMT).

Shapes: ``[B, S, H, D]`` queries, ``[B, S, K, D]`` keys / values (``K`` kv heads,
``G = H / K`` query heads per kv head), rings ``[B, L, K, D]`` with each slot's
position ``pos [B, L]`` (-1 = empty) and document ``seg [B, L]``. The layer using
them is :mod:`longctx.backends.recurrent.mixer`.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp


EPS = 1e-6  # guards s(Q) z = 0 (an empty memory reads as 0)


def elu1(x):
    """Infini-attention's feature map: positive, so the normaliser is > 0."""
    return jax.nn.elu(x) + 1.0


def compressive_read(sq, M, z):
    """``A_mem = s(Q) M / (s(Q) z)``: ``sq [B, S, K, G, D]``, ``M [B, K, D, D]``, ``z [B, K, D]``."""
    num = jnp.einsum("bskgd,bkde->bskge", sq, M)
    den = jnp.einsum("bskgd,bkd->bskg", sq, z)[..., None]
    return num / (den + EPS)


def compressive_write(sk, v, M, z, rule):
    """One segment's write ``(dM [B, K, D, D], dz [B, K, D])`` from ``sk, v [B, S, K, D]``.

    ``sk`` is ``s(K)`` already zeroed on tokens that must not write.
    """
    if rule == "delta":  # retrieve what M already holds for each key, write the rest
        num = jnp.einsum("bskd,bkde->bske", sk, M)
        den = jnp.einsum("bskd,bkd->bsk", sk, z)[..., None]
        v = v - num / (den + EPS)
    return jnp.einsum("bskd,bske->bkde", sk, v), jnp.sum(sk, axis=1)


def gather_rows(buf, idx):
    """``buf [B, L, K, D]``, ``idx [B, K, G, S, k]`` -> ``[B, K, G, S, k, D]``."""
    B, K, G, S, k = idx.shape
    bt = buf.transpose(0, 2, 1, 3)  # [B, K, L, D]
    out = jnp.take_along_axis(bt, idx.reshape(B, K, G * S * k)[..., None], axis=2)
    return out.reshape(B, K, G, S, k, buf.shape[-1])


def knn_read(q0, knn, seg_start, ids, rec):
    """Softmax over the top-k retrieved pairs (Memorizing Transformer, section 3).

    ``q0 [B, S, H, D]`` (before RoPE), ``knn`` the ring ``{k, v [B, L, K, D], pos, seg
    [B, L]}``, ``seg_start [B, S]`` the first position of each query's segment,
    ``ids [B, S]`` its document; ``rec`` the section. Keys at ``seg_start - knn_size
    <= pos < seg_start`` of the same document are retrievable; nothing retrievable
    reads 0. Returns ``[B, S, H, D]`` float32.
    """
    K, D = knn["k"].shape[2], q0.shape[-1]
    qg = einops.rearrange(q0, "b s (k g) d -> b k g s d", k=K)  # GQA groups per kv head
    s = jnp.einsum("bkgsd,blkd->bkgsl", qg, knn["k"].astype(q0.dtype),
                   preferred_element_type=jnp.float32) * D**-0.5
    k_pos = knn["pos"][:, None, None, None, :]
    lo = seg_start[:, None, None, :, None]
    ok = ((k_pos >= 0) & (k_pos < lo) & (k_pos >= lo - rec.knn_size)
          & (knn["seg"][:, None, None, None, :] == ids[:, None, None, :, None]))
    s = jnp.where(ok, s, -jnp.inf)
    if rec.knn_approx:
        top, idx = jax.lax.approx_max_k(s, rec.knn_topk, recall_target=rec.knn_recall)
    else:
        top, idx = jax.lax.top_k(s, rec.knn_topk)  # [B, K, G, S, k]
    vals = gather_rows(knn["v"].astype(jnp.float32), idx)  # [B, K, G, S, k, D]
    m = jnp.max(top, axis=-1, keepdims=True)
    p = jnp.exp(top - jnp.where(jnp.isfinite(m), m, 0.0))  # a row with nothing visible: 0
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    o = jnp.einsum("bkgsn,bkgsnd->bkgsd", p, vals)
    return einops.rearrange(o, "b k g s d -> b s (k g) d")


def with_memory_tokens(q, k_ring, v_ring, mask, ids, mem, ring_mask, positions, seg_start):
    """Queries ``[segment ; read ; write]`` over keys ``[ring ; read ; write]`` and their mask.

    ``mem = (qm [B, 2M, H, D], km, vm [B, 2M, K, D], read_seg [B], write_seg [B])``
    (read rows first). Visibility (Recurrent Memory Transformer, decoder form):
    a segment token sees the read memory of its own document and the ring as
    before, never the write tokens; read tokens see the read tokens only (they are
    known before the segment); write tokens see the read tokens of their
    document, what the segment's last token sees in the ring, and every write
    token. All memory tokens are unrotated (no position).
    """
    qm, km, vm, read_seg, write_seg = mem
    B, S = ids.shape
    M2 = qm.shape[1]
    M = M2 // 2
    L = k_ring.shape[1]
    is_read = (jnp.arange(M2) < M)[None, None, None, None, :]  # [1, 1, 1, 1, 2M] over mem keys
    # Segment rows: the ring (mask) + read keys of the same document.
    tok_mem = is_read & (ids == read_seg[:, None])[:, None, None, :, None]
    tok_rows = jnp.concatenate([mask, jnp.broadcast_to(tok_mem, (B, 1, 1, S, M2))], axis=-1)
    # Read rows: read keys only.
    read_rows = jnp.concatenate([jnp.zeros((B, 1, 1, M, L), bool),
                                 jnp.broadcast_to(is_read, (B, 1, 1, M, M2))], axis=-1)
    # Write rows: as the last token over the ring, read keys of the write document, all writes.
    last = lambda a: jnp.broadcast_to(a[:, -1:], (B, M))  # noqa: E731
    w_ring = ring_mask(last(positions), last(ids), last(seg_start))
    w_mem = jnp.where(is_read, (read_seg == write_seg)[:, None, None, None, None], True)
    write_rows = jnp.concatenate([w_ring, jnp.broadcast_to(w_mem, (B, 1, 1, M, M2))], axis=-1)
    mask = jnp.concatenate([tok_rows, read_rows, write_rows], axis=3)  # [B, 1, 1, S+2M, L+2M]
    q = jnp.concatenate([q, qm.astype(q.dtype)], axis=1)
    k = jnp.concatenate([k_ring, km.astype(k_ring.dtype)], axis=1)
    v = jnp.concatenate([v_ring, vm.astype(v_ring.dtype)], axis=1)
    return q, k, v, mask


def write_ring(buf, slots, k, v, positions, ids):
    """Write ``k, v [B, S, K, D]`` with their positions and ids at ``slots [B, S]`` of a ring."""

    def one(b, slot, new):  # per batch row: b [L, ...], slot [S], new [S, ...]
        return b.at[slot].set(new.astype(b.dtype))

    return {"k": jax.vmap(one)(buf["k"], slots, k), "v": jax.vmap(one)(buf["v"], slots, v),
            "pos": jax.vmap(one)(buf["pos"], slots, positions.astype(jnp.int32)),
            "seg": jax.vmap(one)(buf["seg"], slots, ids)}
