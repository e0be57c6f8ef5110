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
   ``longctx.backends.linear.ops`` per *segment*, not per token: a query never reads
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
   form), ``num_memory_tokens = M``: they cross every layer, so a wrapper around
   the whole stack adds them (:class:`~longctx.backends.recurrent.memory_tokens.MemoryTokens`,
   returned by :meth:`RecurrentAttention.stack_wrapper`): each segment is run as
   ``[read M ; segment ; write M]`` where the read and the write tokens both enter
   as the carried memory (initially a learned embedding); the last layer's
   outputs at the write positions become the next segment's read memory. This
   layer then gets ``x [B, M + S + M, E]`` (positions of memory tokens -1,
   ignored) and applies the visibility of
   :func:`~longctx.backends.recurrent.memory.with_memory_tokens`: memory
   tokens are unrotated, skip the short conv, are never cached and do not read
   the compressive / kNN memories.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.backends.base import MixerDims, causal_pairs
from longctx.backends.full import ops as full_attention
from longctx.backends.full.config import FullConfig
from longctx.backends.full.mixer import FullAttention
from longctx.backends.recurrent.config import RecurrentConfig
from longctx.backends.recurrent.memory import (compressive_read, compressive_write, elu1,
                                               knn_read, with_memory_tokens, write_ring)
from longctx.backends.recurrent.memory_tokens import MemoryTokens
from longctx.layers import param
from longctx.parallel import context


class RecurrentAttention(FullAttention):
    """``full``'s projections, short conv and RoPE; segment memories as state.

    Built from the sizes, the exact-attention section (``model.attention.impl``,
    ``window``, ``conv_size``) and its own section ``model.attention.recurrent``.
    """

    def __init__(self, dims: MixerDims, exact: FullConfig, rec: RecurrentConfig, *,
                 rngs: nnx.Rngs):
        super().__init__(dims, exact, rngs=rngs)
        self.rec = rec  # frozen dataclass: static
        self.seg_len = N = dims.segment_len or dims.max_seq_len
        self.ring = (rec.cache_segments + 1) * N  # XL slots: C previous segments + this one
        self.knn_ring = rec.knn_size + N if rec.knn_size else 0
        H = dims.n_heads
        # Gates start at sigmoid(0) = 1/2; constants, so the rng stream is that of `full`.
        self.mem_gate = (param(rngs, (H,), ("heads",), value=jnp.zeros((H,), jnp.float32))
                         if rec.compressive != "none" else nnx.data(None))
        self.knn_gate = (param(rngs, (H,), ("heads",), value=jnp.zeros((H,), jnp.float32))
                         if rec.knn_size else nnx.data(None))

    @classmethod
    def from_config(cls, dims: MixerDims, attention, *, rngs: nnx.Rngs) -> "RecurrentAttention":
        return cls(dims, attention.section("full"), attention.section("recurrent"), rngs=rngs)

    @classmethod
    def stack_wrapper(cls, dims: MixerDims, attention, *, rngs: nnx.Rngs):
        """Memory tokens (RMT) cross every layer: a wrapper around the stack, or None."""
        M = attention.section("recurrent").num_memory_tokens
        if not M:
            return None
        return MemoryTokens(M, dims.d_model, segment_len=dims.segment_len,
                            std=dims.init_std, rngs=rngs)

    def mixing_flops(self, batch: int, seq_len: int, segment_len: int = 0) -> float:
        """Visible (query, key) pairs of the local attention (``4 H D`` each, as ``full``)
        plus the memories' reads and writes, per segment of ``N`` tokens.

        Segment ``s`` sees ``min(s, C) N`` cached keys; memory tokens add ``2M`` rows
        and keys (segment tokens see the ``M`` read keys, read tokens the read keys,
        write tokens what the last token sees plus all ``2M``); compressive memory
        reads ``s(Q) M`` and ``s(Q) z`` (``2D^2 + 2D`` per query head) and writes
        ``s(K)^T V`` (``2D^2`` per kv head; the delta rule's retrieval doubles it);
        kNN scores every slot of its ring (``2 L D``) and reads ``topk`` values.
        """
        N = segment_len or self.seg_len
        C, M, W = self.rec.cache_segments, self.rec.num_memory_tokens, self.attn.window
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        pairs = 0
        for s, start in enumerate(range(0, seq_len, N)):
            S, cached = min(N, seq_len - start), min(s, C) * N
            pairs += causal_pairs(S, before=cached, window=W)
            if M:
                pairs += S * M + M * M + M * (min(cached + S, W or cached + S) + 2 * M)
        flops = 4.0 * pairs * H * D
        if self.rec.compressive != "none":
            write = 2 * D * D * (2 if self.rec.compressive == "delta" else 1)
            flops += seq_len * (H * (2 * D * D + 2 * D) + K * write)
        if self.rec.knn_size:
            flops += seq_len * H * 2 * D * (self.knn_ring + self.rec.knn_topk)
        return batch * flops

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
        if context.axis_size() > 1:
            raise ValueError(
                f"the recurrent backend runs its segments one after another and cannot split "
                f"a sequence over mesh axis 'sequence' (size {context.axis_size()}); set "
                "mesh.ici.sequence=1 and scale length with model.segment_len instead")
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
        y = self._out(o)
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
        cache = write_ring(cache, positions % self.ring, k, v, positions, ids)
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
            q, k_all, v_all, mask = with_memory_tokens(q, k_all, v_all, mask, ids, mtok,
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
            read = knn_read(q0, knn, seg_start, ids, self.rec)
            new_state["knn"] = write_ring(knn, positions % self.knn_ring, jax.lax.stop_gradient(k0),
                                      jax.lax.stop_gradient(v), positions, ids)
            g = jax.nn.sigmoid(self.knn_gate[...])[:, None]
            o = (g * read + (1 - g) * o.astype(jnp.float32)).astype(q.dtype)
        if mtok is not None:
            o = jnp.concatenate([o, o_mem], axis=1)  # [segment ; read ; write]
        return o, new_state
