"""The forms that run a block (:mod:`~longctx.backends.linear.blocks`) or a step over a sequence.

Inputs ``[B, T, H, ...]`` (None passes through) as the block / step takes them, start
state ``S0 [B, H, K, V]`` float32; each returns ``(o [B, T, H, V], S_T [B, H, K, V])``.
The ops hand the chunk forms their inputs in the caller's dtype (bf16 in training) and a
block that casts them to float32 per step, and ask for ``o`` in the output dtype: the
sequence-long arrays a layer keeps (the padded, chunked inputs, ``o``, their cotangents)
are then bf16, as exact attention's are, and every product still runs in float32.

* :func:`parallel`: the whole sequence as one block (quadratic; the reference).
* :func:`recurrent`: ``lax.scan`` over time, one step per token (the naive
  recurrence and the decoding form).
* :func:`chunk`: the parallel chunk form (the ``chunk`` form of the ops). The
  blocks of ``CHUNKS_PER_STEP`` consecutive chunks (for every batch row and
  head) at once as batched matmuls (intra-chunk outputs, each chunk's ``K^T V``
  contribution, decay, delta-rule WY / UT factors), then the state recurrence
  ``S_{n+1} = decay_n S_n + U_n`` over those chunks (one multiply-add per chunk
  for diagonal decays, or ``lax.associative_scan``, ``DIAGONAL_SCAN``; one
  ``[K, K] x [K, V]`` matmul per chunk for the delta rules; unrolled), then the
  inter-chunk output ``q_eff S_n`` of those chunks at once; a ``lax.scan`` over
  the steps carries the state (one checkpoint per step, ``CHECKPOINT_STEPS``).
  ``CHUNKS_PER_STEP`` is by the platform compiled for (8 on CPU, GPU and TPU:
  bounded, so that a step's intermediates never span the sequence); a platform not
  listed runs every chunk in one step. Scratch memory is linear in ``T`` either way.
* :func:`chunk_scan`: the previous sequential chunk form: one ``lax.scan`` step
  per chunk running that chunk's block (one checkpoint per step). Same results;
  kept as the benchmark baseline (``experiments/bench_linear.py``) and a second
  reference.

Chunking pads the last chunk with zeros (``g = 0``, ``k = v = q = 0``, ``beta = 0``,
``a = b = 0``), which leaves the state unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx import targets

# State recurrence of diagonal decays over chunks: "scan" (one elementwise multiply-add
# per chunk) or "associative" (lax.associative_scan: log2(N) passes over all states).
# On CPU the scan measured faster (experiments/bench_linear.py); "associative" is the
# choice for accelerators where N sequential steps dominate.
DIAGONAL_SCAN = "scan"
# Chunks per scan step of the chunk form (None: all chunks in one step), by the platform
# compiled for. A step materialises its chunks' intermediates (scores, decays, WY / UT
# factors: several [C, C] and [C, K] per chunk and head) at once, forward and backward;
# all chunks in one step keeps them for the whole sequence, several times the scratch of 8
# chunks per step (it made gated DeltaNet need far more memory than exact attention on a
# TPU). Steps are checkpointed, so what lives across steps is only their start states:
# scratch per token is flat in T (tests/test_linear_attention.py checks it). CPU: 8 (a
# step's working set must stay in cache). GPU / TPU: 8 as well: a step's backward scratch
# (several float32 [B, H, G, C, C] and [B, H, G, K, V]) is live at the peak of the layer's
# backward, which at 16 it set in the 1B's compile for a v5p (gated DeltaNet at 8K:
# docs/results/frontier_targets.md); a step still batches
# B x H x 8 chunk matmuls. The fused fast path on accelerators is the Pallas kernels.
CHUNKS_PER_STEP = {"cpu": 8, "gpu": 8, "tpu": 8}
# Checkpoint each step (the backward recomputes its blocks from the step's inputs and
# start state) instead of storing the blocks' residuals: faster on CPU (less memory
# traffic), scratch linear in T either way. A single step is never checkpointed.
CHECKPOINT_STEPS = True
UNROLL_MAX = 16  # the state scan within a step is unrolled up to this many chunks
# Recompute the blocks in the backward pass (jax.checkpoint) inside a step (only
# matters with CHECKPOINT_STEPS = False).
CHECKPOINT_BLOCKS = False


def _heads_first(x):
    """[B, T, H, ...] -> [B, H, T, ...] (None passes through)."""
    return None if x is None else jnp.moveaxis(x, 2, 1)


def _apply(aff, S):
    """The block's affine map on its start state ``S [..., K, V]``: ``(o, S_L)``."""
    o = aff.o + jnp.einsum("...ik,...kv->...iv", aff.q_eff, S)
    if aff.M is not None:
        return o, jnp.einsum("...kj,...jv->...kv", aff.M, S) + aff.U
    return o, (S if aff.decay is None else aff.decay * S) + aff.U


def parallel(block, xs, S0):
    """The whole sequence as one block: quadratic in T (the reference)."""
    o, S = _apply(block(*map(_heads_first, xs)), S0)
    return jnp.moveaxis(o, 1, 2), S


def recurrent(step, xs, S0):
    """``lax.scan`` over time: one step per token (also the decoding form)."""
    S, o = jax.lax.scan(step, S0, tuple(None if x is None else jnp.moveaxis(x, 1, 0)
                                        for x in xs))  # o [T, B, H, V]
    return jnp.moveaxis(o, 0, 1), S


def _pad_to_chunks(xs, chunk_size, n_chunks=None):
    T = xs[0].shape[1]
    C = max(1, min(chunk_size, T))  # a sequence shorter than a chunk is one chunk
    N = -(-T // C) if n_chunks is None else n_chunks
    pad = N * C - T
    padded = tuple(None if x is None else
                   jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs)
    return padded, N, C


def _unroll(U):
    """Unroll the state scan of a step of few chunks (``U [B, H, G, K, V]``)."""
    n = U.shape[2]
    return n if n <= UNROLL_MAX else 1


def _state_starts(aff, S0):
    """Start state of every chunk ``[B, H, N, K, V]`` and the final state, from the chunks'
    affine maps ``[B, H, N, ...]``: the only sequential part of the chunk form."""
    if aff.M is not None:  # delta rules: S_{n+1} = M_n S_n + U_n, one small matmul per chunk
        def step(S, mu):
            M, U = mu
            return jnp.einsum("bhkj,bhjv->bhkv", M, S) + U, S

        S, starts = jax.lax.scan(step, S0, (jnp.moveaxis(aff.M, 2, 0),
                                            jnp.moveaxis(aff.U, 2, 0)), unroll=_unroll(aff.U))
        return jnp.moveaxis(starts, 0, 2), S
    if aff.decay is None:  # no gate: the states are a running sum
        ends = S0[:, :, None] + jnp.cumsum(aff.U, axis=2)
    elif DIAGONAL_SCAN == "associative":  # (d1, U1) then (d2, U2) = (d1 d2, d2 U1 + U2)
        def combine(x, y):
            return x[0] * y[0], y[0] * x[1] + y[1]

        d, U = jax.lax.associative_scan(combine, (aff.decay, aff.U), axis=2)
        ends = d * S0[:, :, None] + U  # [B, H, N, K, V]
    else:  # one elementwise multiply-add per chunk
        def step(S, du):
            return du[0] * S + du[1], S

        S, starts = jax.lax.scan(step, S0, (jnp.moveaxis(aff.decay, 2, 0),
                                            jnp.moveaxis(aff.U, 2, 0)), unroll=_unroll(aff.U))
        return jnp.moveaxis(starts, 0, 2), S
    starts = jnp.concatenate([S0[:, :, None], ends[:, :, :-1]], axis=2)
    return starts, ends[:, :, -1]


def _groups(n_chunks, per_step):
    """Split ``n_chunks`` into ``n_steps`` equal groups of ``G`` chunks (padding < n_steps)."""
    per_step = n_chunks if per_step is None else max(1, min(per_step, n_chunks))
    n_steps = -(-n_chunks // per_step)
    return n_steps, -(-n_chunks // n_steps)


def chunk(block, xs, S0, chunk_size, chunks_per_step=None, out_dtype=jnp.float32):
    """The parallel chunk form (module docstring); ``o`` in ``out_dtype``, cast per step."""
    B, T, H = xs[0].shape[:3]
    per_step = (CHUNKS_PER_STEP.get(targets.platform()) if chunks_per_step is None
                else chunks_per_step)
    n_steps, G = _groups(-(-T // max(1, min(chunk_size, T))), per_step)
    C = max(1, min(chunk_size, T))
    xs, N, C = _pad_to_chunks(xs, chunk_size, n_chunks=n_steps * G)

    # The sequence-long arrays keep their [B, T, H, ...] order: the scan runs over
    # [n_steps, B, G, C, H, ...] (for B = 1 a reshape, no copy) and each step moves its
    # own slice's heads forward (and the output's back). Transposing whole sequences to
    # heads-first instead cost a copy of every input, of the output and of their
    # cotangents per layer (a float32 one where the caller then casts the output).
    def chunks(x):  # [B, N*C, H, ...] -> [n_steps, B, G, C, H, ...]
        if x is None:
            return None
        return jnp.moveaxis(x.reshape(B, n_steps, G, C, *x.shape[2:]), 1, 0)

    blk = jax.checkpoint(block) if CHECKPOINT_BLOCKS else block

    def body(S, x):  # G chunks at once: [B, G, C, H, ...] -> [B, H, G, C, ...]
        aff = blk(*(None if xi is None else jnp.moveaxis(xi, 3, 1) for xi in x))
        starts, S = _state_starts(aff, S)
        o = aff.o + jnp.einsum("bhnck,bhnkv->bhncv", aff.q_eff, starts)  # inter-chunk
        return S, jnp.moveaxis(o.astype(out_dtype), 1, 3)  # [B, G, C, H, V]

    if CHECKPOINT_STEPS and n_steps > 1:  # one step: store its residuals (as before)
        body = jax.checkpoint(body)
    S, o = jax.lax.scan(body, S0, tuple(map(chunks, xs)))  # o [n_steps, B, G, C, H, V]
    o = jnp.moveaxis(o, 0, 1).reshape(B, N * C, H, o.shape[-1])[:, :T]
    return o, S


def chunk_scan(block, xs, S0, chunk_size, out_dtype=jnp.float32):
    """The sequential chunk form: one checkpointed ``lax.scan`` step per chunk (baseline)."""
    B, T, H = xs[0].shape[:3]
    xs, N, C = _pad_to_chunks(xs, chunk_size)

    def chunks(x):  # [B, N*C, H, ...] -> [N, B, H, C, ...]
        if x is None:
            return None
        return jnp.moveaxis(jnp.moveaxis(x.reshape(B, N, C, *x.shape[2:]), 1, 0), 3, 2)

    @jax.checkpoint  # keep only the state at each chunk start for the backward pass
    def body(S, x):
        o, S = _apply(block(*x), S)
        return S, o.astype(out_dtype)

    S, o = jax.lax.scan(body, S0, tuple(map(chunks, xs)))  # o [N, B, H, C, V]
    o = jnp.moveaxis(o, 0, 2).reshape(B, H, N * C, o.shape[-1])[:, :, :T]
    return jnp.moveaxis(o, 1, 2), S


# ----------------------------------------------------------------------------
# Recurrent steps: (S [B, H, K, V], per-token inputs [B, H, ...]) -> (S, o [B, H, V]).
# ----------------------------------------------------------------------------


def _decay(S, g):
    """``exp(g) * S`` for ``g`` None | ``[B, H]`` | ``[B, H, K]`` (rows of S)."""
    if g is None:
        return S
    return S * jnp.exp(g if g.ndim == 3 else g[..., None])[..., None]


def linear_step(S, x):
    q, k, v, g = x
    S = _decay(S, g) + k[..., :, None] * v[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", q, S)


def delta_step(S, x):
    q, k, v, beta, g = x
    S = _decay(S, g)
    u = beta[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, S))
    S = S + k[..., :, None] * u[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", q, S)


def rwkv6_step(S, x):
    r, k, v, w, ruk = x  # ruk [B, H]: sum_d r_d u_d k_d (the bonus)
    o = jnp.einsum("bhk,bhkv->bhv", r, S) + ruk[..., None] * v
    return _decay(S, w) + k[..., :, None] * v[..., None, :], o


def rwkv7_step(S, x):
    r, w, k, v, a, b = x
    ax = jnp.einsum("bhk,bhkv->bhv", a, S)  # a_t S_{t-1}
    S = _decay(S, w) + b[..., :, None] * ax[..., None, :] + k[..., :, None] * v[..., None, :]
    return S, jnp.einsum("bhk,bhkv->bhv", r, S)
