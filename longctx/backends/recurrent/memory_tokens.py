"""Memory tokens (Recurrent Memory Transformer, Bulatov et al. 2022, decoder form):
a wrapper around the whole stack.

Memory tokens cross every layer, so they are not a layer's state but the stack's:
each segment runs as ``[read M ; segment ; write M]``. Both the read and the write
tokens enter as the carried memory (initially a learned embedding ``[M, E]``), so
the write tokens' residual stream carries the memory on (keeping it unchanged
across segments is the default and the layers learn what to add); the last
layer's outputs at the write positions become the next segment's memory,
committed when the segment's last position is reached (so decoding token by
token equals the forward). Memory tokens have position -1 (unrotated); how each
layer lets them see and be seen is the layer's business
(:func:`longctx.backends.recurrent.memory.with_memory_tokens`).

Documents: a row whose segment starts a new document reads the learned initial
memory; a document that starts inside a segment reads no memory until its next
segment; the write tokens continue the read memory only within the same document.

The model driver calls, per segment::

    x, positions, segment_ids, ctx = wrapper.enter(x, positions, segment_ids, state)
    x = blocks(x, positions, segment_ids)
    x, state = wrapper.exit(x, ctx)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from longctx.layers import param


class MemoryTokens(nnx.Module):
    def __init__(self, num_tokens: int, d_model: int, *, segment_len: int, std: float,
                 rngs: nnx.Rngs):
        if segment_len < 1:
            raise ValueError(f"memory tokens need segments; got {segment_len=}")
        self.segment_len = segment_len
        self.memory = param(rngs, (num_tokens, d_model), (None, "embed"), std=std)

    @property
    def num_tokens(self) -> int:
        return self.memory.shape[0]

    def extra_tokens(self, seq_len: int) -> int:
        """Tokens run through every layer besides the sequence's: 2M per segment."""
        return 2 * self.num_tokens * -(-seq_len // self.segment_len)

    def init_state(self, batch_size: int, dtype):
        """The learned initial memory ``[B, M, E]`` and its document id ``[B]``."""
        return {"memory": jnp.broadcast_to(self.memory[...].astype(dtype),
                                           (batch_size, *self.memory.shape)),
                "memory_seg": jnp.zeros((batch_size,), jnp.int32)}

    def enter(self, x, positions, segment_ids, state):
        """``x [B, S, E]`` -> ``[B, M + S + M, E]`` with positions and document ids.

        Returns ``(x, positions, ids, ctx)``; ``ctx`` is what :meth:`exit` needs.
        """
        B, S = positions.shape
        M = self.num_tokens
        ids = (jnp.zeros((B, S), jnp.int32) if segment_ids is None
               else segment_ids.astype(jnp.int32))
        fresh = jnp.broadcast_to(self.memory[...].astype(state["memory"].dtype),
                                 state["memory"].shape)
        reset = (positions[:, 0] % self.segment_len == 0) & (ids[:, 0] != state["memory_seg"])
        memory = jnp.where(reset[:, None, None], fresh, state["memory"])
        mseg = jnp.where(reset, ids[:, 0], state["memory_seg"])
        last = ids[:, -1]
        ids_ext = jnp.concatenate([jnp.broadcast_to(mseg[:, None], (B, M)), ids,
                                   jnp.broadcast_to(last[:, None], (B, M))], axis=1)
        write = jnp.where((mseg == last)[:, None, None], memory, fresh)
        x = jnp.concatenate([memory.astype(x.dtype), x, write.astype(x.dtype)], axis=1)
        none = jnp.full((B, M), -1, jnp.int32)  # memory tokens have no position
        positions = jnp.concatenate([none, positions, none], axis=1)
        commit = (positions[:, -M - 1] + 1) % self.segment_len == 0  # the segment ends here
        return x, positions, ids_ext, (memory, mseg, last, commit)

    def exit(self, x, ctx):
        """``x [B, M + S + M, E]`` (the last layer's output) -> ``(x [B, S, E], state)``."""
        memory, mseg, last, commit = ctx
        M = self.num_tokens
        written = x[:, -M:]
        state = {"memory": jnp.where(commit[:, None, None], written.astype(memory.dtype), memory),
                 "memory_seg": jnp.where(commit, last, mseg)}
        return x[:, M:-M], state
