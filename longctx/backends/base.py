"""The one protocol every token mixer follows, and the explicit sizes it is built from.

A mixer is an ``nnx.Module`` with::

    init_state(batch_size, dtype) -> State              # pytree of fixed shapes
    __call__(x, *, positions, state=None, segment_ids=None) -> (y, new_state)

``x [B, S, E]`` is one segment; ``positions [B, S]`` its absolute token positions;
``segment_ids [B, S]`` its document ids (packed rows). With ``state=None`` the
segment is the whole sequence and ``new_state`` is None. The model driver
(``longctx.model.transformer``) scans segments carrying every layer's state, so
one mechanism gives training at any length, long-term memory, decoding (a segment
of one token) and hybrid stacks (each layer its own backend and kind of state).

What generic code asks a mixer instead of testing its name:

* ``from_config(dims, attention, *, rngs)``: build from the explicit sizes and the
  ``model.attention`` section (each mixer picks its own sub-section there);
* ``mixing_flops(batch, seq_len, segment_len)``: forward FLOPs of the token mixing
  that ``6 * params * tokens`` does not count (scores, state updates), for MFU;
* ``stack_wrapper(dims, attention, *, rngs)``: an optional module that wraps the
  whole stack (memory tokens of the recurrent backend), or None.
"""

from __future__ import annotations

from dataclasses import dataclass

from flax import nnx


@dataclass(frozen=True)
class MixerDims:
    """Explicit sizes and model-wide settings a mixer is built from (no ``ModelConfig``)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: str = "float32"  # compute dtype; parameters stay float32
    init_std: float = 0.02  # normal init of input projections
    out_std: float = 0.02  # init of the output (residual) projection; the model computes it once
    rope_theta: float = 10_000.0
    rope_scaling: object = None  # a RopeScalingConfig; None: RoPE as trained
    rope_layout: str = "half"  # half (rotate-half) | interleaved
    norm_eps: float = 1e-6  # RMSNorm epsilon of norms inside a mixer (q/k norm)
    max_seq_len: int = 4096  # KV-cache slots of exact attention when carrying state
    segment_len: int = 0  # the model's segment length; 0: one pass


class Mixer(nnx.Module):
    """Base class of the token mixers: the protocol above, with its defaults."""

    # Token order the stateless call expects when the mesh splits the sequence (context
    # parallelism): "natural", or "zigzag" (longctx.parallel.context). The model permutes
    # its tokens once per forward iff every layer says "zigzag".
    token_layout = "natural"

    @classmethod
    def from_config(cls, dims: MixerDims, attention, *, rngs: nnx.Rngs) -> "Mixer":
        raise NotImplementedError(f"{cls.__name__} must define from_config")

    @classmethod
    def stack_wrapper(cls, dims: MixerDims, attention, *, rngs: nnx.Rngs):
        """A module run around the whole stack for this backend's layers, or None."""
        del dims, attention, rngs
        return None

    def init_state(self, batch_size: int, dtype):
        raise NotImplementedError(f"{type(self).__name__} must define init_state")

    def mixing_flops(self, batch: int, seq_len: int, segment_len: int = 0) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define mixing_flops")


def causal_pairs(n_queries: int, *, before: int = 0, window: int | None = None) -> int:
    """Visible (query, key) pairs of ``n_queries`` consecutive causal queries.

    Query ``t`` (0-based) sees the ``before`` keys in front of the block plus keys
    ``0..t`` of the block, at most ``window`` of them: ``sum_t min(before + t + 1, W)``.
    """
    if window is None:
        return n_queries * before + n_queries * (n_queries + 1) // 2
    below = max(0, min(n_queries, window - before))  # queries whose count is under the cap
    return below * before + below * (below + 1) // 2 + (n_queries - below) * window
