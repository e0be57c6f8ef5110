"""The ``recurrent`` token mixer: segment attention with long-term memory.

The 100K -> 1M+ regime: the model scans over segments of ``N = model.segment_len``
tokens (``longctx.model.transformer``) and this layer's state is its memory, so
training memory does not grow with the length. Inside a segment a query attends
exactly to the segment so far plus the cached previous segments; three memories,
each switched on by ``model.attention.recurrent`` and composable, reach further:

1. **Transformer-XL cache** (Dai et al. 2019), ``cache_segments = C``: the
   post-RoPE keys/values of the previous ``C`` segments, under stop-gradient
   (positions come from the model and continue across segments). Stored as a ring
   of ``(C + 1) * N`` slots written at ``position % ((C + 1) * N)`` with each
   key's position and document id; a query at ``p`` sees keys at
   ``(p // N - C) * N <= pos <= p``. Because the window is aligned to segments by
   position, not by call, decoding one token at a time (``model.step``) sees
   exactly what the segment forward sees. ``C = 0`` is attention inside the
   segment only.
2. **Compressive memory** (Infini-attention, Munkhdalai et al. 2024, section 2.1),
   ``compressive = linear | delta``: per kv head a matrix ``M [D, D]`` and
   normaliser ``z [D]`` (float32), read by segment ``s`` as
   ``A_mem = s(Q) M_{s-1} / (s(Q) z_{s-1})`` with ``s = elu + 1``, and updated
   once the segment is complete::

       linear:  M_s = M_{s-1} + s(K)^T V
       delta:   M_s = M_{s-1} + s(K)^T (V - s(K) M_{s-1} / (s(K) z_{s-1}))
       both:    z_s = z_{s-1} + sum_t s(K_t)

   mixed with the local attention by a learned per-head gate
   ``sigmoid(b) A_mem + (1 - sigmoid(b)) A_local`` (``b`` starts at 0). The
   segment-level update is two einsums (the recurrence of
   ``longctx.attention.linear`` per *segment*, not per token: a query never reads
   its own segment's writes there, the exact local attention covers those). A
   decode step adds its token's write to a pending ``dM, dz`` that is committed
   when the segment's last position is reached, so decoding equals the forward.
3. **kNN memory** (Memorizing Transformer, Wu et al. 2022, section 3), ``knn_size
   = Mk``: a ring buffer of past ``(k, v)`` per kv head, not differentiated. A
   query at ``p`` retrieves the ``knn_topk`` keys with the largest dot product
   (exact ``jax.lax.top_k``, or ``jax.lax.approx_max_k`` with ``knn_approx``)
   among those at ``p // N * N - Mk <= pos < p // N * N`` (the ``Mk`` tokens
   before its segment), attends to them with a softmax of their own and is mixed
   in by a second per-head gate, as in the paper. The buffer has ``Mk + N``
   slots so that decoding (write after every token) never overwrites a pair the
   forward would still retrieve.

Compressive and kNN memory address by content: they use q, k *before* RoPE (the
Memorizing Transformer's memory keys carry no position either); the XL cache uses
the rotated keys, as the local attention does.

Documents (``segment_ids [B, S]``, packed rows with non-decreasing ids; padding
-1): nothing crosses a boundary. The XL cache and the kNN buffer store each
key's id and mask on it; the compressive memory stores the id it was written
under and reads as zero from another document (and the write of a segment keeps
only the tokens of the segment's last document).

Without memories (compressive ``none``, ``knn_size 0``) and without state the
layer is exactly the ``full`` backend (same parameters, same kernel call);
the extra gate parameters are initialised to constants, so a model built from
the same ``nnx.Rngs`` has the same weights as the ``full`` model.

4. **Memory tokens** (Recurrent Memory Transformer, Bulatov et al. 2022, decoder
   form), ``num_memory_tokens = M``: they cross every layer, so the model driver
   (``longctx.model.transformer``) adds them: each segment is run as
   ``[read M ; segment ; write M]`` where the read and the write tokens both enter
   as the carried memory (initially a learned embedding); the last layer's
   outputs at the write positions become the next segment's read memory. This
   layer then gets ``x [B, M + S + M, E]`` (positions of memory tokens -1,
   ignored) and applies the visibility of :func:`_with_memory_tokens`: memory
   tokens are unrotated, skip the short conv, are never cached and do not read
   the compressive / kNN memories.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.attention import full as full_attention
from longctx.config import ModelConfig
from longctx.model.layers import param
from longctx.model.mixers.full import FullAttention

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


def _gather_rows(buf, idx):
    """``buf [B, L, K, D]``, ``idx [B, K, G, S, k]`` -> ``[B, K, G, S, k, D]``."""
    B, K, G, S, k = idx.shape
    bt = buf.transpose(0, 2, 1, 3)  # [B, K, L, D]
    out = jnp.take_along_axis(bt, idx.reshape(B, K, G * S * k)[..., None], axis=2)
    return out.reshape(B, K, G, S, k, buf.shape[-1])


class RecurrentAttention(FullAttention):
    """``full``'s projections, short conv and RoPE; segment memories as state."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.rec = rec = cfg.attention.recurrent
        self.seg_len = N = cfg.segment_len or cfg.max_seq_len
        self.ring = (rec.cache_segments + 1) * N  # XL slots: C previous segments + this one
        self.knn_ring = rec.knn_size + N if rec.knn_size else 0
        H = cfg.n_heads
        # Gates start at sigmoid(0) = 1/2; constants, so the rng stream is that of `full`.
        self.mem_gate = (param(rngs, (H,), ("heads",), value=jnp.zeros((H,), jnp.float32))
                         if rec.compressive != "none" else nnx.data(None))
        self.knn_gate = (param(rngs, (H,), ("heads",), value=jnp.zeros((H,), jnp.float32))
                         if rec.knn_size else nnx.data(None))

    @property
    def _has_memory(self):
        return self.rec.compressive != "none" or bool(self.rec.knn_size)

    def init_state(self, batch_size: int, dtype=jnp.float32):
        B, K, D = batch_size, self.n_kv_heads, self.head_dim

        def ring(L):  # k/v [B, L, K, D], their positions (-1 = empty) and document ids
            return {"k": jnp.zeros((B, L, K, D), dtype), "v": jnp.zeros((B, L, K, D), dtype),
                    "pos": jnp.full((B, L), -1, jnp.int32), "seg": jnp.zeros((B, L), jnp.int32)}

        state = ring(self.ring)
        if self.conv_size:
            state["conv"] = super().init_state(batch_size, dtype)["conv"]
        if self.rec.compressive != "none":
            zM, zz = jnp.zeros((B, K, D, D), jnp.float32), jnp.zeros((B, K, D), jnp.float32)
            state["mem"] = {"M": zM, "z": zz,  # committed through the last complete segment
                            "dM": zM, "dz": zz,  # pending writes of the current segment
                            "mseg": jnp.zeros((B,), jnp.int32),  # document of M, z
                            "seg": jnp.zeros((B,), jnp.int32)}  # document of the last token
        if self.rec.knn_size:
            state["knn"] = ring(self.knn_ring)
        return state

    def __call__(self, x, *, positions, state=None, segment_ids=None):
        dt = self.dtype
        Mt = self.rec.num_memory_tokens
        mem_x = mem_ids = None
        if Mt:  # x = [read memory ; segment ; write memory] (the model driver's layout)
            if state is None or segment_ids is None:
                raise ValueError("memory tokens need the model's segment scan (a state) and "
                                 "segment ids for [read ; segment ; write]")
            mem_x = (x[:, :Mt], x[:, -Mt:])
            mem_ids = (segment_ids[:, 0], segment_ids[:, -1])  # documents of read / write
            x, positions, segment_ids = x[:, Mt:-Mt], positions[:, Mt:-Mt], segment_ids[:, Mt:-Mt]
        # q0, k0: before RoPE, content keys for the compressive and kNN memories.
        q, k, v, q0, k0, conv_state = self._qkv(x, positions, state, segment_ids)
        a = self.attn
        if state is None and not self._has_memory:  # one segment, no memory: `full` exactly
            o = full_attention.attention(q, k, v, causal=True, window=a.window,
                                         segment_ids=segment_ids, impl=a.impl,
                                         block_q=a.block_q, block_k=a.block_k)
            new_state = None
        else:
            B, S = positions.shape
            if S > self.seg_len:
                raise ValueError(f"a call of {S=} tokens exceeds the segment length "
                                 f"{self.seg_len} (model.segment_len, or max_seq_len if 0)")
            stateless = state is None
            if stateless:
                state = self.init_state(B, dt)
            ids = (jnp.zeros((B, S), jnp.int32) if segment_ids is None
                   else segment_ids.astype(jnp.int32))
            mtok = None
            if Mt:  # memory tokens: projections only (no short conv, no RoPE: no position)
                mtok = (*self._project(jnp.concatenate(mem_x, axis=1)), *mem_ids)
            o, new_state = self._segment(q, k, v, q0, k0, positions, ids, state, mtok)
            if conv_state is not None:
                new_state["conv"] = conv_state
            if stateless:
                new_state = None
        y = jnp.einsum("bshd,hde->bse", o, self.wo[...].astype(dt))
        if Mt:  # back to the caller's layout [read ; segment ; write]
            y = jnp.concatenate([y[:, S:S + Mt], y[:, :S], y[:, S + Mt:]], axis=1)
        return y, new_state

    # -- one segment with state ------------------------------------------------

    def _segment(self, q, k, v, q0, k0, positions, ids, state, mtok=None):
        N, C = self.seg_len, self.rec.cache_segments
        seg_start = positions // N * N  # [B, S]: first position of each query's segment
        new_state = {}

        # 1. Local attention: this segment and the C before it (XL cache, no gradient).
        cache = jax.lax.stop_gradient({n: state[n] for n in ("k", "v", "pos", "seg")})
        cache = _write(cache, positions % self.ring, k, v, positions, ids)
        new_state.update(cache)

        def ring_mask(q_pos, q_seg, q_start):  # [B, Sq] each -> [B, 1, 1, Sq, L]
            k_pos = cache["pos"][:, None, None, None, :]  # [B, 1, 1, 1, L]
            ok = full_attention.visible(
                q_pos[:, None, None, :, None], k_pos, causal=True, window=self.attn.window,
                q_seg=q_seg[:, None, None, :, None], k_seg=cache["seg"][:, None, None, None, :])
            return ok & (k_pos >= 0) & (k_pos >= q_start[:, None, None, :, None] - C * N)

        mask = ring_mask(positions, ids, seg_start)
        k_all, v_all = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
        S = q.shape[1]
        if mtok is not None:  # memory tokens
            q, k_all, v_all, mask = _with_memory_tokens(q, k_all, v_all, mask, ids, mtok,
                                                        ring_mask, positions, seg_start)
        o = full_attention.masked_attention(q, k_all, v_all, mask)
        if mtok is not None:  # memory rows (after the segment's S) bypass the memories below
            o, o_mem = o[:, :S], o[:, S:]
            q = q[:, :S]

        # 2. Compressive memory: read M_{s-1}, write this segment (committed at its end).
        if self.rec.compressive != "none":
            mem = state["mem"]
            B, S, H, D = q.shape
            K = self.n_kv_heads
            sq = elu1(q0.astype(jnp.float32)).reshape(B, S, K, H // K, D)
            read = compressive_read(sq, mem["M"], mem["z"]).reshape(B, S, H, D)
            read = jnp.where((ids == mem["mseg"][:, None])[..., None, None], read, 0.0)
            last = ids[:, -1]  # [B]: the document the state continues into
            same = (mem["mseg"] == last)[:, None, None, None]
            M_eff, z_eff = jnp.where(same, mem["M"], 0.0), jnp.where(same[..., 0], mem["z"], 0.0)
            sk = elu1(k0.astype(jnp.float32)) * (ids == last[:, None])[..., None, None]
            dM, dz = compressive_write(sk, v.astype(jnp.float32), M_eff, z_eff,
                                       self.rec.compressive)
            keep = (mem["seg"] == last)[:, None, None, None]  # pending writes of this document
            dM = dM + jnp.where(keep, mem["dM"], 0.0)
            dz = dz + jnp.where(keep[..., 0], mem["dz"], 0.0)
            commit = ((positions[:, -1] + 1) % N == 0)[:, None, None, None]
            new_state["mem"] = {
                "M": jnp.where(commit, M_eff + dM, mem["M"]),
                "z": jnp.where(commit[..., 0], z_eff + dz, mem["z"]),
                "dM": jnp.where(commit, 0.0, dM), "dz": jnp.where(commit[..., 0], 0.0, dz),
                "mseg": jnp.where(commit[:, 0, 0, 0], last, mem["mseg"]), "seg": last}
            g = jax.nn.sigmoid(self.mem_gate[...])[:, None]  # [H, 1]
            o = (g * read + (1 - g) * o.astype(jnp.float32)).astype(q.dtype)

        # 3. kNN memory: top-k over the Mk tokens before this segment (read, then write).
        if self.rec.knn_size:
            knn = jax.lax.stop_gradient(state["knn"])
            read = self._knn_read(q0, knn, seg_start, ids)
            new_state["knn"] = _write(knn, positions % self.knn_ring, jax.lax.stop_gradient(k0),
                                      jax.lax.stop_gradient(v), positions, ids)
            g = jax.nn.sigmoid(self.knn_gate[...])[:, None]
            o = (g * read + (1 - g) * o.astype(jnp.float32)).astype(q.dtype)
        if mtok is not None:
            o = jnp.concatenate([o, o_mem], axis=1)  # [segment ; read ; write]
        return o, new_state

    def _knn_read(self, q0, knn, seg_start, ids):
        """Softmax over the top-k retrieved pairs: ``q0 [B, S, H, D]`` -> ``[B, S, H, D]``."""
        rec, K, D = self.rec, self.n_kv_heads, self.head_dim
        qg = full_attention._grouped(q0, K)  # [B, K, G, S, D]
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
        vals = _gather_rows(knn["v"].astype(jnp.float32), idx)  # [B, K, G, S, k, D]
        p = jnp.exp(top - full_attention._safe_softmax_stats(top)[..., None])
        l = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(l == 0, 1.0, l)  # nothing retrievable: reads 0
        o = jnp.einsum("bkgsn,bkgsnd->bkgsd", p, vals)
        return full_attention._ungrouped(o)


def _with_memory_tokens(q, k_ring, v_ring, mask, ids, mem, ring_mask, positions, seg_start):
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


def _write(buf, slots, k, v, positions, ids):
    """Write ``k, v [B, S, K, D]`` with their positions and ids at ``slots [B, S]`` of a ring."""

    def one(b, slot, new):  # per batch row: b [L, ...], slot [S], new [S, ...]
        return b.at[slot].set(new.astype(b.dtype))

    return {"k": jax.vmap(one)(buf["k"], slots, k), "v": jax.vmap(one)(buf["v"], slots, v),
            "pos": jax.vmap(one)(buf["pos"], slots, positions.astype(jnp.int32)),
            "seg": jax.vmap(one)(buf["seg"], slots, ids)}
