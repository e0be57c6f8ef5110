"""The chunk grid shared by the linear-attention and delta-rule Pallas kernels.

Both kernels walk a sequence chunk by chunk carrying a float32 ``[K, V]`` state. Here
that walk is a Pallas grid ``(N, n_chunks)`` (``N`` = batch rows x heads):

* axis 0 (``"parallel"``): one (batch row, head) per index; independent, so the
  compiler may split it over TensorCores (megacore);
* axis 1 (``"arbitrary"``, sequential): the chunks, first to last in the forward,
  last to first in the backward; the state (forward) or the state's cotangent
  (backward) lives in a VMEM scratch buffer that persists across it.

Every block is one chunk: ``(C, K)`` / ``(C, V)`` rows of a per-token array
``[N, Tp, X]``, one chunk's ``[a, b]`` of a per-chunk array ``[N, n_chunks, a, b]``
(the packed scalar gates, the chunk start states), or one ``[K, V]`` of a per-sequence
array ``[N, K, V]`` (initial / final state). Nothing whole-sequence is on chip, so the
VMEM a kernel needs does not depend on ``T`` (:func:`vmem_bytes` counts it).

Scalar gates (one per token) travel packed, ``[N, n_chunks, 2, C]`` (row 0 the
in-chunk cumulative log gate ``b``, row 1 the reset count ``r``): a chunk's scalars
fill lanes, where a ``[T, 1]`` column would take a 128-lane tile per token. The
kernel turns the row into the column it needs by :func:`to_col` (a masked lane
reduction), because Mosaic has no general ``(1, C) -> (C, 1)`` reshape.

Mosaic's tiling rule (the last two block dims divisible by (8, 128), or equal to the
array's) holds for every block here: the last two dims of each block are the array's
own (``K``, ``V``, ``C``, ``2``) or ``C`` rows, and ``C`` must be a multiple of 8
(float32: the kernels compute in float32, whatever the input dtype), checked by
:func:`check_chunk`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longctx import targets

MiB = 2**20
# VMEM per TensorCore by generation (jax/_src/pallas/mosaic/tpu_info.py; the compiler's
# own "... of 63.94M vmem" on v5p). Unknown kinds get the smallest.
VMEM_CAPACITY = {"v4": 16 * MiB, "v5e": 128 * MiB, "v5p": 64 * MiB, "v6e": 128 * MiB}
# Headroom over the kernel's own block accounting (Mosaic's internal scratch, the
# temporaries of the chunk math that the accounting estimates coarsely).
VMEM_HEADROOM = 2


def dot_nt(a, b):
    """``a @ b.T`` without materialising a transpose (Mosaic's native form)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """``a.T @ b``."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _eye(n):
    return (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
            == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))


def to_col(x):
    """``[1, n] -> [n, 1]`` by a masked lane reduction (exact: one nonzero term per sum)."""
    n = x.shape[1]
    if n == 1:
        return x
    return jnp.sum(jnp.where(_eye(n), jnp.broadcast_to(x, (n, n)), 0.0), axis=1, keepdims=True)


def to_row(x):
    """``[n, 1] -> [1, n]`` (the inverse of :func:`to_col`)."""
    n = x.shape[0]
    if n == 1:
        return x
    return jnp.sum(jnp.where(_eye(n), jnp.broadcast_to(x, (n, n)), 0.0), axis=0, keepdims=True)


def iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def check_chunk(C: int, T: int, chunk_size: int):
    """Mosaic needs float32 row blocks in multiples of 8 sublanes."""
    if C % 8:
        raise ValueError(
            f"form='pallas' needs chunk_size a multiple of 8 (float32 blocks of (8, 128) "
            f"tiles); got {chunk_size=} (effective chunk {C} for {T=})")


# ----------------------------------------------------------------------------
# BlockSpecs: every array's block is one chunk (or the whole per-sequence state).
# ----------------------------------------------------------------------------


def _spec(x, C, n_chunks, reverse, per_sequence=False):
    """The BlockSpec of ``x`` on the grid ``(N, n_chunks)``; see the module docstring."""
    def chunk(c):
        return n_chunks - 1 - c if reverse else c

    if per_sequence:  # [N, K, V]: the same block for every chunk of a sequence
        return pl.BlockSpec((None, *x.shape[1:]), lambda n, c: (n, 0, 0))
    if len(x.shape) == 3:  # per token [N, Tp, X]
        return pl.BlockSpec((None, C, x.shape[2]), lambda n, c: (n, chunk(c), 0))
    # per chunk [N, n_chunks, a, b]
    return pl.BlockSpec((None, None, *x.shape[2:]), lambda n, c: (n, chunk(c), 0, 0))


def _padded_bytes(block):
    """VMEM bytes of one float32 block: the last two dims rounded up to (8, 128) tiles."""
    *lead, a, b = (1, *block) if len(block) == 1 else block
    n = 1
    for d in lead:
        n *= d
    return n * (-(-a // 8) * 8) * (-(-b // 128) * 128) * 4


def vmem_bytes(blocks, scratch, temporaries):
    """The kernel's own VMEM accounting: every in/out block double-buffered (Pallas
    pipelines the next chunk's copy with this chunk's compute), the scratch once, and
    the chunk math's temporaries (block shapes, counted once each)."""
    return (2 * sum(map(_padded_bytes, blocks)) + sum(map(_padded_bytes, scratch))
            + sum(map(_padded_bytes, temporaries)))


def vmem_limit(need: int) -> int:
    """``vmem_limit_bytes`` for the target generation: ``VMEM_HEADROOM`` x the kernel's
    accounting, at least 16 MiB (the smallest default scoped limit, so the compiler's own
    scratch never gets less than it would by default), at most 3/4 of the generation's
    VMEM (the rest stays XLA's). Raises naming the values when the kernel cannot fit."""
    chip = targets.chip_of_kind(targets.device_kind()) if targets.platform() == "tpu" else None
    name = chip.name if chip else "unknown TPU"
    capacity = VMEM_CAPACITY.get(name, min(VMEM_CAPACITY.values()))
    cap = capacity * 3 // 4
    if VMEM_HEADROOM * need > cap:
        raise ValueError(f"Pallas chunk kernel needs {need / MiB:.1f} MiB of VMEM (blocks + "
                         f"scratch + temporaries, x{VMEM_HEADROOM} headroom); the {name} "
                         f"allows {cap / MiB:.0f} MiB of its {capacity / MiB:.0f} MiB. Use a "
                         f"smaller chunk_size")
    return min(cap, max(16 * MiB, VMEM_HEADROOM * need))


def _compiler_params(need):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                vmem_limit_bytes=vmem_limit(need))


# ----------------------------------------------------------------------------
# Kernel bodies
# ----------------------------------------------------------------------------


def _fwd_kernel(chunk, n_in, with_states, *refs):
    """One chunk of one sequence: ``refs`` = ``n_in`` chunk inputs, ``S_0``, then ``o``,
    ``S_T``, (the chunk's start state), then the state scratch."""
    ins, s0_ref, o_ref, sT_ref = refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2]
    st_ref = refs[n_in + 3] if with_states else None
    S_ref = refs[-1]

    @pl.when(pl.program_id(1) == 0)
    def _():
        S_ref[...] = s0_ref[...]

    S = S_ref[...]
    if with_states:
        st_ref[...] = S
    o, S = chunk(*(x[...] for x in ins), S)
    o_ref[...] = o.astype(o_ref.dtype)
    S_ref[...] = S
    sT_ref[...] = S  # every step: the last chunk's write is the one that stays


def _bwd_kernel(chunk_bwd, n_in, n_grads, *refs):
    """One chunk, last to first: ``refs`` = ``n_in`` chunk inputs, the chunk's start state,
    ``do``, ``dS_T``, then ``n_grads`` gradients, ``dS_0``, then the cotangent scratch."""
    ins, (st_ref, do_ref, dsT_ref) = refs[:n_in], refs[n_in:n_in + 3]
    grads, ds0_ref, dS_ref = refs[n_in + 3:n_in + 3 + n_grads], refs[-2], refs[-1]

    @pl.when(pl.program_id(1) == 0)
    def _():
        dS_ref[...] = dsT_ref[...]

    *gs, dS = chunk_bwd(*(x[...] for x in ins), st_ref[...], do_ref[...], dS_ref[...])
    for ref, x in zip(grads, gs):
        ref[...] = x.astype(ref.dtype)
    dS_ref[...] = dS
    ds0_ref[...] = dS


# ----------------------------------------------------------------------------
# The two pallas_calls
# ----------------------------------------------------------------------------


def _block(spec_shape):
    return tuple(d for d in spec_shape if d is not None)


def forward(chunk, ins, S0, C, *, interpret, with_states, temporaries=()):
    """The forward walk. ``ins``: per-token ``[N, Tp, X]`` / per-chunk ``[N, n, a, b]``
    float32 inputs of ``chunk(*blocks, S) -> (o [C, V], S')``; ``S0 [N, K, V]``.

    Returns ``(o [N, Tp, V], S_T [N, K, V])``, plus the chunk start states
    ``[N, n_chunks, K, V]`` with ``with_states`` (the backward's residual)."""
    N, Tp = ins[0].shape[:2]
    K, V = S0.shape[1:]
    n = Tp // C
    in_specs = [_spec(x, C, n, False) for x in ins] + [_spec(S0, C, n, False, True)]
    out_shape = [jax.ShapeDtypeStruct((N, Tp, V), jnp.float32),
                 jax.ShapeDtypeStruct((N, K, V), jnp.float32)]
    if with_states:
        out_shape.append(jax.ShapeDtypeStruct((N, n, K, V), jnp.float32))
    out_specs = [_spec(out_shape[0], C, n, False), _spec(out_shape[1], C, n, False, True)]
    out_specs += [_spec(s, C, n, False) for s in out_shape[2:]]
    return _walk(functools.partial(_fwd_kernel, chunk, len(ins), with_states), (N, n),
                 in_specs, out_specs, out_shape, (K, V), temporaries, interpret)(*ins, S0)


def backward(chunk_bwd, ins, grad_shapes, states, do, dS_T, C, *, interpret, temporaries=()):
    """The backward walk, last chunk first. ``chunk_bwd(*blocks, S, do, dS) -> (*grads,
    dS_prev)``; ``grad_shapes``: the gradients' array shapes (per token or per chunk).

    Returns ``(*grads, dS_0 [N, K, V])`` (float32)."""
    N, Tp = ins[0].shape[:2]
    K, V = dS_T.shape[1:]
    n = Tp // C
    do, dS_T = do.astype(jnp.float32), dS_T.astype(jnp.float32)
    in_specs = ([_spec(x, C, n, True) for x in (*ins, states, do)]
                + [_spec(dS_T, C, n, True, True)])
    out_shape = [jax.ShapeDtypeStruct(s, jnp.float32) for s in (*grad_shapes, (N, K, V))]
    out_specs = ([_spec(s, C, n, True) for s in out_shape[:-1]]
                 + [_spec(out_shape[-1], C, n, True, True)])
    return _walk(functools.partial(_bwd_kernel, chunk_bwd, len(ins), len(grad_shapes)), (N, n),
                 in_specs, out_specs, out_shape, (K, V), temporaries,
                 interpret)(*ins, states, do, dS_T)


def _walk(kernel, grid, in_specs, out_specs, out_shape, state, temporaries, interpret):
    """The ``pallas_call`` of a walk over ``grid = (N, n_chunks)`` carrying a float32 ``state``
    ``(K, V)`` in VMEM scratch, its VMEM limit from the blocks' own accounting."""
    blocks = [_block(s.block_shape) for s in in_specs + out_specs]
    need = vmem_bytes(blocks, [state], list(temporaries))
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, scratch_shapes=[pltpu.VMEM(state, jnp.float32)],
                          compiler_params=None if interpret else _compiler_params(need),
                          interpret=interpret)
