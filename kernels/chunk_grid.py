"""The chunk grid shared by the linear-attention and delta-rule Pallas kernels (TPU, Mosaic).

Both kernels walk a sequence chunk by chunk carrying a float32 ``[K, V]`` state. Here
that walk is a Pallas grid (``N`` = batch rows x heads):

* forward ``(N, n_chunks)``: axis 0 ``"parallel"``, one (batch row, head) per index
  (independent, so the compiler may split it over TensorCores); axis 1 ``"arbitrary"``
  (sequential), the chunks first to last, the state in a VMEM scratch buffer that
  persists across it;
* backward ``(N, n_groups, 2 M - 1)``: the chunks in groups of ``M`` (:func:`group_of`),
  the groups last to first. The forward saves the state at the start of each group
  only (``[N, n_groups, K, V]`` float32 in HBM: ``K V / (C M)`` floats per token and
  head); per group the backward first recomputes the group's chunk start states on
  chip (``M - 1`` forward steps of ``chunk_state`` into a ``[M, K, V]`` VMEM scratch),
  then walks its ``M`` chunks last to first (``chunk_bwd``), carrying the state's
  cotangent ``dS [K, V]`` in a second scratch buffer. The price is one extra forward
  state pass (no outputs) in the backward, whatever ``M``.

Every block is one chunk: ``(C, K)`` / ``(C, V)`` rows of a per-token array
``[N, Tp, X]``, one chunk's ``[a, b]`` of a per-chunk array ``[N, n_chunks, a, b]``
(the packed scalar gates), one group's ``[K, V]`` of the saved states, or one ``[K, V]``
of a per-sequence array ``[N, K, V]`` (initial / final state). Nothing whole-sequence
is on chip, so the VMEM a kernel needs does not depend on ``T`` (:func:`vmem_bytes`
counts it). Per-token blocks arrive in the input dtype (bfloat16 stays bfloat16 in HBM
and on the DMA) and the kernel casts them to float32 on chip (exact); outputs leave in
their array's dtype.

Scalar gates (one per token) travel packed, ``[N, n_chunks, 2, C]`` (row 0 the
in-chunk cumulative log gate ``b``, row 1 the reset count ``r``): a chunk's scalars
fill lanes, where a ``[T, 1]`` column would take a 128-lane tile per token. The
kernel turns the row into the column it needs by :func:`to_col` (a masked lane
reduction), because Mosaic has no general ``(1, C) -> (C, 1)`` reshape.

Mosaic's tiling rule (the last two block dims divisible by the dtype's tile, (8, 128)
for 32-bit and (16, 128) for 16-bit, or equal to the array's) holds for every block
here: the last two dims of each block are the array's own (``K``, ``V``, ``C``, ``2``)
or ``C`` rows, and ``C`` must be a multiple of the row tile, checked by
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
# Chunks per saved state, M (:func:`group_of`). The saved states cost ``4 K V / (C M)``
# bytes per token and head of HBM, the backward's ``[M, K, V]`` float32 scratch of
# recomputed states ``4 M K V`` bytes of VMEM; the recompute is one forward state pass
# whatever M. So M is the smallest that makes the saved states at most half the bytes
# of q, k, v (``(2 K + V) itemsize`` per token and head): the HBM residual is then a
# fraction of the inputs at every length, and no VMEM is spent beyond that. The scratch
# is capped at STATE_SCRATCH_BYTES, a quarter of the smallest generation's VMEM (v4,
# 16 MiB), so with the chunk's own blocks (under 3 MiB at head_dim 256, chunk 64) and
# the x2 headroom the backward fits every generation. Examples (bf16): head_dim 256,
# C = 16 (per-key gates) wants M = 22, capped at 16 (saved states 1 KiB per token and
# head against 1.5 KiB of q, k, v; 4 MiB of VMEM); head_dim 256, C = 64: M = 6 (1.5 MiB);
# head_dim 128, C = 64: M = 3; head_dim 64, C = 64: M = 2 (32 KiB).
STATE_SCRATCH_BYTES = 4 * MiB


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


def pick_row(x, i):
    """Row ``i`` of ``x [n, m]`` as ``[1, m]`` by a masked sublane reduction (exact: one nonzero
    term per sum; finite ``x``). Used instead of a slice ``x[i:i+1]``, which Triton has no
    lowering for (registers are not addressable), and with a traced ``i`` too."""
    return jnp.sum(jnp.where(iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def check_chunk(C: int, T: int, chunk_size: int, dtype=jnp.float32):
    """Mosaic tiles row blocks in 8 sublanes of 32 bits: 8 rows of float32, 16 of bfloat16."""
    rows = 8 * 4 // jnp.dtype(dtype).itemsize
    if C % rows:
        raise ValueError(
            f"form='pallas' needs chunk_size a multiple of {rows} ({jnp.dtype(dtype).name} "
            f"blocks of ({rows}, 128) tiles); got {chunk_size=} (effective chunk {C} for {T=})")


def group_of(K: int, V: int, C: int, itemsize: int, n_chunks: int, cap: int | None = None) -> int:
    """Chunks per saved state, ``M`` (see ``STATE_SCRATCH_BYTES``): the smallest whose saved
    states are at most half the bytes of q, k, v (``itemsize`` their dtype's), at most
    ``cap`` (default: the VMEM scratch budget of this walker) and ``n_chunks``."""
    want = -(-2 * 4 * K * V // (C * (2 * K + V) * itemsize))
    cap = STATE_SCRATCH_BYTES // (4 * K * V) if cap is None else cap
    return max(1, min(want, cap, n_chunks))


# ----------------------------------------------------------------------------
# VMEM accounting
# ----------------------------------------------------------------------------


def _padded_bytes(block):
    """VMEM bytes of one float32 block: the last two dims rounded up to (8, 128) tiles (an
    upper bound for a bfloat16 block too: (16, 128) tiles of half the bytes)."""
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


# ----------------------------------------------------------------------------
# Kernel bodies
# ----------------------------------------------------------------------------


def _load(refs):
    """The blocks of ``refs`` as float32 values (bfloat16 inputs cast on chip: exact)."""
    return [r[...].astype(jnp.float32) for r in refs]


def _fwd_kernel(chunk, n_in, M, *refs):
    """One chunk of one sequence: ``refs`` = ``n_in`` chunk inputs, ``S_0``, then ``o``,
    ``S_T``, (the group's start state, when ``M``), then the state scratch."""
    ins, s0_ref, o_ref, sT_ref = refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2]
    S_ref = refs[-1]
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _():
        S_ref[...] = s0_ref[...]

    S = S_ref[...]
    if M:  # the saved state's block stays on chip for the group's M steps: write it once
        st_ref = refs[n_in + 3]

        @pl.when(c % M == 0)
        def _():
            st_ref[...] = S

    o, S = chunk(*_load(ins), S)
    o_ref[...] = o.astype(o_ref.dtype)
    S_ref[...] = S
    sT_ref[...] = S  # every step: the last chunk's write is the one that stays


def _bwd_kernel(chunk_state, chunk_bwd, n_in, n_grads, M, n, *refs):
    """Step ``s`` of group ``g`` (groups last to first): ``s < M - 1`` recomputes the start
    state of the group's chunk ``s + 1``; ``s >= M - 1`` is the backward of its chunk
    ``j = 2 M - 2 - s``. ``refs`` = ``n_in`` chunk inputs, the group's saved start state,
    ``do``, ``dS_T``, then ``n_grads`` gradients, ``dS_0``, then the scratch: ``dS [K, V]``
    and the group's chunk start states ``[M, K, V]``."""
    ins, (st_ref, do_ref, dsT_ref) = refs[:n_in], refs[n_in:n_in + 3]
    grads, ds0_ref = refs[n_in + 3:n_in + 3 + n_grads], refs[n_in + 3 + n_grads]
    dS_ref, states_ref = refs[-2], refs[-1]
    g, s = pl.program_id(1), pl.program_id(2)
    first = (pl.num_programs(1) - 1 - g) * M  # the group's first chunk
    j = 2 * M - 2 - s

    @pl.when((g == 0) & (s == 0))
    def _():
        dS_ref[...] = dsT_ref[...]

    @pl.when(s == 0)
    def _():
        states_ref[0] = st_ref[...]

    @pl.when((s < M - 1) & (first + s + 1 < n))  # (the last group may be short)
    def _():
        states_ref[s + 1] = chunk_state(*_load(ins), states_ref[s])

    @pl.when((s >= M - 1) & (first + j < n))
    def _():
        *gs, dS = chunk_bwd(*_load(ins), states_ref[j], do_ref[...].astype(jnp.float32),
                            dS_ref[...])
        for ref, x in zip(grads, gs):
            ref[...] = x.astype(ref.dtype)
        dS_ref[...] = dS
        ds0_ref[...] = dS


# ----------------------------------------------------------------------------
# BlockSpecs and the two pallas_calls
# ----------------------------------------------------------------------------


def _block_spec(x, C, index):
    """The BlockSpec of ``x`` given ``index(grid ids) -> (row n, chunk c)``: per token
    ``[N, Tp, X]`` (block ``(C, X)``), per chunk ``[N, n, a, b]`` (one chunk's ``[a, b]``),
    or per sequence ``[N, K, V]`` (``index`` None: one block per row)."""
    if index is None:
        return pl.BlockSpec((None, *x.shape[1:]), lambda i, *_: (i, 0, 0))
    if len(x.shape) == 3:
        return pl.BlockSpec((None, C, x.shape[2]), lambda *ids: (*index(*ids), 0))
    return pl.BlockSpec((None, None, *x.shape[2:]), lambda *ids: (*index(*ids), 0, 0))


def forward(chunk, ins, S0, C, *, interpret, out_dtype, group=0, temporaries=()):
    """The forward walk. ``ins``: per-token ``[N, Tp, X]`` / per-chunk ``[N, n, a, b]``
    inputs (any float dtype) of ``chunk(*float32 blocks, S) -> (o [C, V], S')``;
    ``S0 [N, K, V]`` float32.

    Returns ``(o [N, Tp, V] out_dtype, S_T [N, K, V])``, plus with ``group = M > 0`` the
    start state of every M-th chunk ``[N, ceil(n / M), K, V]`` (the backward's residual)."""
    N, Tp = ins[0].shape[:2]
    K, V = S0.shape[1:]
    n = Tp // C
    at = lambda i, c: (i, c)  # noqa: E731
    in_specs = [_block_spec(x, C, at) for x in ins] + [_block_spec(S0, C, None)]
    out_shape = [jax.ShapeDtypeStruct((N, Tp, V), out_dtype),
                 jax.ShapeDtypeStruct((N, K, V), jnp.float32)]
    out_specs = [_block_spec(out_shape[0], C, at), _block_spec(out_shape[1], C, None)]
    if group:
        out_shape.append(jax.ShapeDtypeStruct((N, -(-n // group), K, V), jnp.float32))
        out_specs.append(_block_spec(out_shape[2], C, lambda i, c: (i, c // group)))
    return _walk(functools.partial(_fwd_kernel, chunk, len(ins), group), (N, n),
                 ("parallel", "arbitrary"), in_specs, out_specs, out_shape,
                 [(K, V)], temporaries, interpret, "chunk_fwd_mosaic")(*ins, S0)


def backward(chunk_state, chunk_bwd, ins, grad_shapes, states, do, dS_T, C, *, group,
             interpret, temporaries=()):
    """The backward walk over groups of ``group = M`` chunks, last first (module docstring).
    ``chunk_state(*blocks, S) -> S'`` (the forward's state update alone); ``chunk_bwd(*blocks,
    S, do, dS) -> (*grads, dS_prev)``; ``grad_shapes``: the gradients' ``ShapeDtypeStruct``s
    (per token or per chunk); ``states [N, ceil(n / M), K, V]`` from :func:`forward`.

    Returns ``(*grads, dS_0 [N, K, V] float32)``."""
    N, Tp = ins[0].shape[:2]
    K, V = dS_T.shape[1:]
    n, M = Tp // C, group
    n_groups = -(-n // M)
    if states.shape != (N, n_groups, K, V):
        raise ValueError(f"states must be [N, ceil(n / M), K, V] = {(N, n_groups, K, V)} for "
                         f"{n=} chunks, group {M=}; got {states.shape=}")

    def chunk(g, s, phase):  # the chunk step s of group g reads (clamped: a short last group)
        j = jnp.where(s < M - 1, phase(s), 2 * M - 2 - s)
        return jnp.minimum((n_groups - 1 - g) * M + j, n - 1)

    fwd_then_bwd = lambda i, g, s: (i, chunk(g, s, lambda s: s))  # noqa: E731
    # outputs (and do) keep the block of the group's first backward chunk through the
    # recompute steps, so nothing is written back before the kernel has written it
    bwd_only = lambda i, g, s: (i, chunk(g, s, lambda s: M - 1))  # noqa: E731
    in_specs = ([_block_spec(x, C, fwd_then_bwd) for x in ins]
                + [_block_spec(states, C, lambda i, g, s: (i, n_groups - 1 - g)),
                   _block_spec(do, C, bwd_only), _block_spec(dS_T, C, None)])
    out_shape = [*grad_shapes, jax.ShapeDtypeStruct((N, K, V), jnp.float32)]
    out_specs = ([_block_spec(s, C, bwd_only) for s in grad_shapes]
                 + [_block_spec(out_shape[-1], C, None)])
    kernel = functools.partial(_bwd_kernel, chunk_state, chunk_bwd, len(ins), len(grad_shapes),
                               M, n)
    return _walk(kernel, (N, n_groups, 2 * M - 1), ("parallel", "arbitrary", "arbitrary"),
                 in_specs, out_specs, out_shape, [(K, V), (M, K, V)], temporaries,
                 interpret, "chunk_bwd_mosaic")(*ins, states, do, dS_T)


def _walk(kernel, grid, semantics, in_specs, out_specs, out_shape, scratch, temporaries,
          interpret, name):
    """The ``pallas_call`` of a walk over ``grid`` with float32 VMEM ``scratch`` buffers, its
    VMEM limit from the blocks' own accounting."""
    blocks = [tuple(d for d in s.block_shape if d is not None) for s in in_specs + out_specs]
    need = vmem_bytes(blocks, scratch, list(temporaries))
    params = None if interpret else pltpu.CompilerParams(dimension_semantics=semantics,
                                                         vmem_limit_bytes=vmem_limit(need))
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape,
                          scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in scratch],
                          compiler_params=params, interpret=interpret, name=name)
