"""The chunk walker of the linear-attention and delta-rule kernels for GPU (Pallas Triton).

The same chunk math as the TPU walker (:mod:`longctx.kernels.chunk_grid`: ``chunk_fwd``,
``chunk_state``, ``chunk_bwd`` of each kernel, traced unchanged), walked the way Triton
runs: one program per (batch row, head) (grid ``(N,)``), and inside it a ``fori_loop`` over
the chunks carrying the float32 ``[K, V]`` state (backward: its cotangent) as a loop value
in registers. The Triton backend has no scratch memory (``pltpu.VMEM``) and no sequential
grid axis, so the loop is the kernel's own; each program's refs are its row's whole
arrays (``[Tp, X]``, ``[n, a, b]``, ``[K, V]``) in global memory, read and written one
chunk at a time (``pl.ds(c * C, C)``): nothing is staged per ``T``.

Forward: the start state of every ``M``-th chunk goes to the states output
``[N, ceil(n / M), K, V]`` (the backward's residual, as on TPU). Backward, chunks last to
first: chunk ``c`` of group ``G`` gets its start state by ``c - G M`` state-only steps
(``chunk_state``) from the group's saved state. With no scratch to keep a group's states
in, that is ``M (M - 1) / 2`` recomputed steps per group, ``(M - 1) / 2`` forward state
passes in all: ``GROUP_MAX`` bounds it.

Triton's constraints (``jax/_src/pallas/triton/lowering.py``), checked by
:func:`check_shapes`: every loaded or stored block has a power-of-two size, so ``C``, ``K``
and ``V`` are powers of two; ``tt.dot`` needs every dim ``>= 16`` (``C``, ``K``, ``V >= 16``);
value slices have no lowering (the chunk math picks rows by masked reductions). float32
dots lower with IEEE precision, the numerics of the interpret-mode tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Chunks per saved state on GPU, at most. The backward recomputes (M - 1) / 2 forward state
# passes (one [K, C] x [C, V] matmul and a decay each per chunk, against the ~10 matmuls of
# a chunk's fwd + bwd); M = 8 costs 3.5 of them and cuts the saved states 8x (4 K V / (8 C)
# bytes per token and head: 2 KiB at head_dim 256, C = 16).
GROUP_MAX = 8
# V tile: one program per (row, V tile), the state's tile at most STATE_TILE floats. A
# [K, V] state at head_dim 256 asks Triton for 324-388 KiB of shared memory (its dot
# operands and layout conversions), over the H100's 227 KiB per block: the compiler's
# "Shared memory size limit exceeded: requested 331776, available: 232448"; tiles of
# [256, 64] still asked 233472 for the delta rule with chunk 64, tiles of 8K floats
# ([128, 64], [256, 32]) fit every kernel. The V columns of the state evolve independently
# (o, S' and the delta rule's u = U~ - W S are column-wise in V), so a tile is the same
# chunk math on fewer columns; the key-side gradients sum over V and come back as float32
# partial sums, one per tile (their HBM grows with the tile count: see the GPU results).
STATE_TILE = 8192
# Warps per program: the state is one [K, V] float32 value (64K floats at head_dim 256), so
# more threads hold more of it in registers. Triton's default is 4.
NUM_WARPS = 8


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_shapes(C: int, K: int, V: int, T: int, chunk_size: int):
    """Triton needs power-of-two blocks and ``tt.dot`` dims ``>= 16``: ``C``, ``K``, ``V``."""
    bad = {name: x for name, x in (("chunk", C), ("K", K), ("V", V))
           if not _is_pow2(x) or x < 16}
    if bad:
        raise ValueError(
            f"form='pallas' on GPU (Triton) needs the chunk, head_dim K and value dim V "
            f"powers of two >= 16 (power-of-two blocks, tt.dot tiles of 16); got {bad} "
            f"({chunk_size=}, {T=})")


def chunk_of(chunk_size: int, T: int) -> int:
    """The chunk Triton runs: ``chunk_size``, or ``T`` rounded up to a power of two >= 16."""
    return max(1, min(chunk_size, max(16, 1 << max(0, T - 1).bit_length())))


def _spec(x, vt=None):
    """One program's block of ``x [N, ...]``: its row whole, or with ``vt`` its V tile (the
    last dim split in tiles of ``vt``; grid ``(N, n_tiles)``)."""
    nd = len(x.shape)
    if vt is None:
        return pl.BlockSpec((None, *x.shape[1:]), lambda i, j: (i,) + (0,) * (nd - 1))
    return pl.BlockSpec((None, *x.shape[1:-1], vt), lambda i, j: (i,) + (0,) * (nd - 2) + (j,))


def _partial_spec(shape):
    """The block of tile ``j``'s partial sum ``[n_tiles, N, ...]`` of a key-side gradient."""
    nd = len(shape)
    return pl.BlockSpec((None, None, *shape[1:]), lambda i, j: (j, i) + (0,) * (nd - 1))


def v_tile(K: int, V: int) -> int:
    """The V tile: ``V``, or the widest power of two >= 16 whose ``[K, tile]`` state is at
    most ``STATE_TILE`` floats (``K``, ``V`` powers of two, so it divides ``V``)."""
    return min(V, max(16, STATE_TILE // K))


def _load(ref, c, C):
    """Chunk ``c`` of a per-token ``[Tp, X]`` or per-chunk ``[n, a, b]`` ref, float32."""
    x = ref[pl.ds(c * C, C), :] if len(ref.shape) == 2 else ref[c]
    return x.astype(jnp.float32)


def _store(ref, c, C, x):
    if len(ref.shape) == 2:
        ref[pl.ds(c * C, C), :] = x.astype(ref.dtype)
    else:
        ref[c] = x.astype(ref.dtype)


def _params(interpret):
    return None if interpret else pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def forward(chunk, ins, S0, C, *, interpret, out_dtype, group=0, temporaries=(), value=2):
    """The forward walk; the contract of ``chunk_grid.forward`` (``temporaries``, the Mosaic
    walker's VMEM accounting, is unused: Triton sizes its own registers / shared memory).
    ``ins[value]`` is the value-side input (``v``, the delta rule's ``U~``): it, ``o`` and
    the state are split in V tiles, one program each; the other inputs are read whole."""
    del temporaries
    N, Tp = ins[0].shape[:2]
    K, V = S0.shape[1:]
    n, n_in, M, vt = Tp // C, len(ins), group, v_tile(K, V)
    out_shape = [jax.ShapeDtypeStruct((N, Tp, V), out_dtype),
                 jax.ShapeDtypeStruct((N, K, V), jnp.float32)]
    if M:
        out_shape.append(jax.ShapeDtypeStruct((N, -(-n // M), K, V), jnp.float32))

    def kernel(*refs):
        ins, s0_ref, o_ref, sT_ref = refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2]

        def step(c, S):
            if M:  # (lax.rem / lax.div: c >= 0; jnp's floor-mod adds a sign fix-up in i1)
                @pl.when(jax.lax.rem(c, M) == 0)
                def _():
                    refs[n_in + 3][jax.lax.div(c, M)] = S

            o, S = chunk(*(_load(x, c, C) for x in ins), S)
            _store(o_ref, c, C, o)
            return S

        sT_ref[...] = jax.lax.fori_loop(0, n, step, s0_ref[...].astype(jnp.float32))

    in_specs = [_spec(x, vt if a == value else None) for a, x in enumerate(ins)]
    return pl.pallas_call(kernel, grid=(N, V // vt), in_specs=in_specs + [_spec(S0, vt)],
                          out_specs=[_spec(s, vt) for s in out_shape], out_shape=out_shape,
                          compiler_params=_params(interpret), interpret=interpret,
                          name="chunk_fwd_triton")(*ins, S0)


def backward(chunk_state, chunk_bwd, ins, grad_shapes, states, do, dS_T, C, *, group,
             interpret, temporaries=(), value=2):
    """The backward walk, last chunk first; the contract of ``chunk_grid.backward``. Per V
    tile (as in :func:`forward`): the value-side gradient (``grad_shapes[value]``) and
    ``dS_0`` are the tile's own; the key-side gradients (q, k, gates, W) sum over V, so
    with several tiles each program writes its partial sum, float32 ``[n_tiles, ...]``,
    and they are added here."""
    del temporaries
    N, Tp = ins[0].shape[:2]
    K, V = dS_T.shape[1:]
    n, n_in, n_grads, M, vt = Tp // C, len(ins), len(grad_shapes), group, v_tile(K, V)
    nv = V // vt
    if states.shape != (N, -(-n // M), K, V):
        raise ValueError(f"states must be [N, ceil(n / M), K, V] = {(N, -(-n // M), K, V)} "
                         f"for {n=} chunks, group {M=}; got {states.shape=}")
    partial = [a != value and nv > 1 for a in range(n_grads)]
    out_shape = [jax.ShapeDtypeStruct((nv, *s.shape), jnp.float32) if p else s
                 for s, p in zip(grad_shapes, partial)]
    out_shape.append(jax.ShapeDtypeStruct((N, K, V), jnp.float32))
    out_specs = [_partial_spec(s.shape[1:]) if p else _spec(s, vt if a == value else None)
                 for a, (s, p) in enumerate(zip(out_shape, partial))]
    out_specs.append(_spec(out_shape[-1], vt))

    def kernel(*refs):
        ins, (st_ref, do_ref, dsT_ref) = refs[:n_in], refs[n_in:n_in + 3]
        grads, ds0_ref = refs[n_in + 3:n_in + 3 + n_grads], refs[-1]

        def step(t, dS):
            c = n - 1 - t
            G = jax.lax.div(c, M)
            S = jax.lax.fori_loop(  # the chunk's start state from its group's saved one
                G * M, c, lambda i, S: chunk_state(*(_load(x, i, C) for x in ins), S),
                st_ref[G])
            *gs, dS = chunk_bwd(*(_load(x, c, C) for x in ins), S, _load(do_ref, c, C), dS)
            for ref, x in zip(grads, gs):
                _store(ref, c, C, x)
            return dS

        ds0_ref[...] = jax.lax.fori_loop(0, n, step, dsT_ref[...].astype(jnp.float32))

    in_specs = [_spec(x, vt if a == value else None) for a, x in enumerate(ins)]
    outs = pl.pallas_call(kernel, grid=(N, nv),
                          in_specs=in_specs + [_spec(x, vt) for x in (states, do, dS_T)],
                          out_specs=out_specs, out_shape=out_shape,
                          compiler_params=_params(interpret), interpret=interpret,
                          name="chunk_bwd_triton")(*ins, states, do, dS_T)
    grads = (x.sum(0).astype(s.dtype) if p else x
             for x, s, p in zip(outs[:-1], grad_shapes, partial))
    return (*grads, outs[-1])
