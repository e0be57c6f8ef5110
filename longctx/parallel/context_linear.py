"""Sequence-parallel linear attention, delta rule, RWKV-6 and RWKV-7 (state passing).

Same signatures and results as :func:`longctx.backends.linear.ops.linear_attention` /
``delta_rule`` (``g`` per key: Kimi Delta Attention) / ``rwkv6`` / ``rwkv7`` (chunk
form), on global arrays sharded along time over ``axis`` of the current mesh
(contiguous split: device ``i`` holds tokens ``[i T/N, (i+1) T/N)``; recurrences need
natural order, so there is no zigzag here)::

    q, k [B, T, H, K]   v [B, T, H, V]   g None | [B, T, H] | [B, T, H, K]   beta [B, T, H]
    initial_state, final_state [B, H, K, V] float32

Built only on the public ops. Every recurrence of the family is affine in its
start state: over a device's chunk ``S_end = M S_start + S_loc`` and every
output ``o_t = o0_t + P_t S_start``, where

* ``o0, S_loc``: the op from a zero state (the chunk's own contribution);
* ``P [Tl, K]`` per head and ``M [K, K]``: the op with ``v = 0`` and the identity
  as initial state ("identity-start trick"): with no values written,
  ``S_t = M_t I = M_t``, its output is ``scale q_t M_t = P_t`` and its final state
  ``M``. For gated linear attention ``M`` is the diagonal decay
  ``exp(sum g)``; for the delta rule it is ``prod_t (I - beta_t k_t^T k_t) exp(g_t)``.

Then the small per-device summaries ``(M, S_loc)`` (``[B, H, K, K + V]``) are
all-gathered, each device folds the prefix of the devices before it
(``S_in = M_{i-1} (... (M_0 S_0 + S_loc_0) ...) + S_loc_{i-1}``) and finishes with
``o = o0 + P S_in``. Communication: one all-gather of ``N`` summaries, none of the
``T``-long arrays; the backward pass (plain autodiff) reduce-scatters their
cotangents. Compute: two passes of the op per device (the second with ``V = K``).
The final state is the last device's end state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longctx.backends.linear import ops as linear_ops
from longctx.parallel.context import axis_size, check_split


def _sequence_parallel(op, q, k, v, extras, *, g, scale, initial_state, output_final_state,
                       chunk_size, axis, replicated=()):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(f"sequence-parallel {op.__name__} needs a current mesh with axis "
                         f"{axis!r} (jax.set_mesh)")
    n = axis_size(axis)
    B, T, H, K = q.shape
    V = v.shape[-1]
    check_split(T, n, False)
    S0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))

    def local(q, k, v, g, extras, replicated, S0):
        extras = extras + replicated
        kw = dict(g=g, scale=scale, chunk_size=chunk_size, output_final_state=True)
        # Start states differ per device (shard_map's varying type), as the scanned ones do.
        vary = lambda x: jax.lax.pcast(x, (axis,), to="varying")  # noqa: E731
        o0, S_loc = op(q, k, v, *extras, initial_state=vary(jnp.zeros((B, H, K, V), jnp.float32)),
                       **kw)  # [B, Tl, H, V], [B, H, K, V]
        eye = vary(jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, H, K, K)))
        Pm, M = op(q, k, jnp.zeros(q.shape[:3] + (K,), jnp.float32), *extras,
                   initial_state=eye, **kw)  # [B, Tl, H, K], [B, H, K, K]
        Ms = jax.lax.all_gather(M, axis)  # [N, B, H, K, K]
        Ss = jax.lax.all_gather(S_loc, axis)  # [N, B, H, K, V]
        idx = jax.lax.axis_index(axis)
        S_in = S0
        for j in range(n - 1):  # the prefix of the devices before this one; N small, static
            S_in = jnp.where(j < idx, jnp.einsum("bhkl,bhlv->bhkv", Ms[j], S_in) + Ss[j], S_in)
        o = o0.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", Pm.astype(jnp.float32), S_in)
        S_end = jnp.einsum("bhkl,bhlv->bhkv", M, S_in) + S_loc  # this chunk's end state
        return o.astype(v.dtype), S_end[None]

    seq = P(None, axis)
    g_spec = None if g is None else seq
    f = jax.shard_map(local, in_specs=(seq, seq, seq, g_spec, tuple(seq for _ in extras),
                                       tuple(P() for _ in replicated), P()),
                      out_specs=(seq, P(axis)), axis_names=frozenset({axis}))
    o, S_ends = f(q, k, v, g, tuple(extras), tuple(replicated), S0)  # S_ends [N, B, H, K, V]
    return o, (S_ends[-1] if output_final_state else None)  # the last device's end state


def linear_attention(q, k, v, *, g=None, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64, axis="sequence"):
    """:func:`longctx.backends.linear.ops.linear_attention` with time split over ``axis``."""
    return _sequence_parallel(linear_ops.linear_attention, q, k, v, (), g=g, scale=scale,
                              initial_state=initial_state,
                              output_final_state=output_final_state, chunk_size=chunk_size,
                              axis=axis)


def delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, chunk_size=64, axis="sequence"):
    """:func:`longctx.backends.linear.ops.delta_rule` with time split over ``axis``."""
    return _sequence_parallel(linear_ops.delta_rule, q, k, v, (beta,), g=g, scale=scale,
                              initial_state=initial_state,
                              output_final_state=output_final_state, chunk_size=chunk_size,
                              axis=axis)


def _rwkv6_op(r, k, v, w, u, *, g, **kw):
    del g
    return linear_ops.rwkv6(r, k, v, w, u, **kw)


def _rwkv7_op(r, k, v, w, a, b, *, g, **kw):
    del g
    return linear_ops.rwkv7(r, w, k, v, a, b, **kw)


def rwkv6(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, axis="sequence"):
    """:func:`longctx.backends.linear.ops.rwkv6` with time split over ``axis``.

    The identity-start trick holds: with ``v = 0`` the bonus term vanishes and the
    state is ``diag(exp sum w) S_0``, the output ``scale r_t diag(exp b_{t-1}) S_0``."""
    return _sequence_parallel(_rwkv6_op, r, k, v, (w,), g=None, scale=scale,
                              initial_state=initial_state,
                              output_final_state=output_final_state, chunk_size=chunk_size,
                              axis=axis, replicated=(u,))


def rwkv7(r, w, k, v, a, b, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, axis="sequence"):
    """:func:`longctx.backends.linear.ops.rwkv7` with time split over ``axis``.

    The generalized delta rule is linear in the state, so the identity-start trick gives
    the device's transition ``M`` ([K, K]: the product of ``diag(exp w_t) + b_t^T a_t``)."""
    return _sequence_parallel(_rwkv7_op, r, k, v, (w, a, b), g=None, scale=scale,
                              initial_state=initial_state,
                              output_final_state=output_final_state, chunk_size=chunk_size,
                              axis=axis)
