"""The segment engine: one ``lax.scan`` over segments of a sequence, carrying state.

Shared by the model's forward (``Transformer.__call__`` with ``model.segment_len``)
and the trainer's windowed loss (``longctx.train.step.segment_value_and_grad``),
so that segment slicing and the truncated-BPTT cut exist once:

* segment ``i`` is sliced from the ``[B, T]`` arrays inside the scan (no reshaped
  copy of the batch), the arrays padded once to whole segments (:func:`pad_time`);
* each segment is one ``jax.checkpoint``: the backward pass keeps only the carried
  state between segments and recomputes a segment from it;
* with ``bptt = k`` the carried state passes through ``stop_gradient`` before
  every segment ``i > 0`` with ``i % k == 0``: gradients flow back at most ``k``
  segments (truncated BPTT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_segments(seq_len: int, segment_len: int) -> int:
    return -(-seq_len // segment_len)


def pad_time(data: dict, length: int, fill: dict) -> dict:
    """Pad every ``[B, T, ...]`` array of ``data`` along time to ``length`` with ``fill[name]``."""
    out = {}
    for name, x in data.items():
        pad = length - x.shape[1]
        out[name] = x if not pad else jnp.pad(
            x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill[name])
    return out


def bptt_cut(state, i, bptt: int):
    """``state`` under ``stop_gradient`` if segment ``i`` starts a new BPTT window."""
    if not bptt:
        return state
    cut = (i % bptt == 0) & (i > 0)
    return jax.tree.map(lambda s: jnp.where(cut, jax.lax.stop_gradient(s), s), state)


def scan_segments(fn, params, state, data: dict, indices, *, segment_len: int, bptt: int = 0):
    """``lax.scan`` of ``fn(params, state, segment, i) -> (state, out)`` over ``indices``.

    ``data``: dict of ``[B, T', ...]`` arrays padded to whole segments; ``segment``
    holds their ``[B, segment_len, ...]`` slices of segment ``i``. ``params`` is
    passed explicitly (not closed over) so that each checkpointed segment
    differentiates with respect to it. Returns ``(state, outs stacked over indices)``.
    """
    N = segment_len

    @jax.checkpoint  # per segment: the backward pass recomputes a segment from its state
    def one(params, state, i):
        state = bptt_cut(state, i, bptt)
        segment = {name: jax.lax.dynamic_slice_in_dim(x, i * N, N, axis=1)
                   for name, x in data.items()}
        return fn(params, state, segment, i)

    return jax.lax.scan(lambda st, i: one(params, st, i), state, indices)
