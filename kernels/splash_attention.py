"""Exact attention through JAX's Pallas TPU splash-attention kernels (``impl="splash"``).

Wraps ``jax.experimental.pallas.ops.tpu.splash_attention`` (Mosaic TPU kernels
with a block-sparse mask: blocks that the mask hides entirely are never
computed; forward, dq and dkv kernels, a custom VJP) behind the contract of
``longctx.backends.full.ops.attention``::

    splash_attention(q, k, v, *, causal=True, scale=None, window=None,
                     segment_ids=None, block_q=512, block_k=512, interpret=False) -> o
    q [B, T, Hq, D]     k, v [B, S, Hkv, D]     segment_ids [B, T] (T == S)

The reference it is tested against is ``longctx.backends.full.ops.reference_attention``
(and ``jax.nn.dot_product_attention``); the masks are the same:

* query ``i`` sits at position ``i + (S - T)`` (bottom-right aligned) --
  ``CausalMask(offset=S - T)`` / ``LocalMask(offset=S - T)``;
* ``causal``: key <= query; ``window=W``: ``LocalMask`` with ``(W - 1, 0)``
  (causal) or ``(W - 1, W - 1)`` (symmetric band);
* ``segment_ids``: the kernel's ``SegmentIds(q, kv)``.

GQA: the MQA kernel (one K/V head shared by ``G`` query heads) runs once per KV
head -- ``jax.vmap`` over the ``Hkv`` groups and over the batch -- so K and V are
never repeated.

Lengths: the kernels need ``T % block_q == 0`` and ``S % block_k == 0`` with
``block_k`` a multiple of 128 (the TPU lane width). Blocks are clamped to the
length rounded up to 128; ``q`` is padded to ``Tp`` and ``k, v`` to
``Sp >= S + (Tp - T)``, and segment ids keep real and padded tokens apart
(padded tokens share one sentinel id). With the bottom-right offset, padded query
``T + m`` sits at position ``S + m`` and sees padded key ``S + m`` (so no row of
the softmax is empty) and no real key; real queries never see a padded key.

Scale: the kernels compute ``softmax(q k^T) v``; ``q`` is multiplied by
``scale`` (default ``D ** -0.5``) first, in ``q``'s dtype (as MaxText does).

Sharding: a Pallas call is opaque to GSPMD (it would be run replicated, i.e.
everything gathered onto every device). Under a multi-device mesh
(``jax.set_mesh``) the call is therefore wrapped in ``jax.shard_map`` over the
batch and head axes (specs from the active logical-axis rules, as the MoE layer
does); the sequence must be whole on each device (context parallelism is its
own path), so a ``length`` dimension split over the mesh is gathered by the
shard_map's input spec. Inside a ``shard_map`` already (all axes manual) the
kernel runs per device as is.

Hardware: Mosaic kernels compile for TPU only. ``interpret=True`` runs the
same kernel bodies through the Pallas interpreter on any backend (CPU in the
tests; far too slow to time). On a non-TPU backend without ``interpret`` this
raises (naming the backend) rather than falling back.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from longctx import targets
from longctx.parallel import sharding as shd

log = logging.getLogger(__name__)

LANES = 128  # TPU lane width: the kernels' block_k granularity
_PAD_ID = int(jnp.iinfo(jnp.int32).min)  # segment id of padded tokens


def available() -> bool:
    """Can the compiled (non-interpreted) kernels run on the target (the devices being
    compiled for, :func:`longctx.targets.platform`)?"""
    return targets.platform() == "tpu"


def _round_up(n, m):
    return -(-n // m) * m


def block_sizes(T: int, S: int, block_q: int, block_k: int) -> tuple[int, int]:
    """Blocks for lengths ``T, S``: the configured sizes, clamped to the length rounded
    up to 128 (a short sequence is one block, not a huge padded one)."""
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < LANES or b % LANES:
            raise ValueError(f"impl='splash': {name}={b} must be a positive multiple of "
                             f"{LANES} (the TPU lane width)")
    return min(block_q, _round_up(T, LANES)), min(block_k, _round_up(S, LANES))


def make_mask(Tp: int, Sp: int, *, offset: int, causal: bool, window: int | None):
    """The static ``[Tp, Sp]`` splash mask (padded shape; ``offset = S - T``)."""
    if window is not None:
        return sa.LocalMask((Tp, Sp), (window - 1, 0 if causal else window - 1), offset)
    if causal:
        return sa.CausalMask((Tp, Sp), offset=offset)
    return sa.FullMask((Tp, Sp))


def _kernel(Tp, Sp, G, offset, causal, window, bq, bk, interpret):
    """The MQA kernel for one KV head and its ``G`` query heads.

    Built inside the trace that calls it: its mask info (numpy, from the static mask)
    becomes constants of that program. Nothing runs on a device here, so the kernel
    builds under a mesh of compile-only devices (an ahead-of-time compile for a TPU
    from a CPU machine) as on the TPU itself."""
    mask = sa.MultiHeadMask([make_mask(Tp, Sp, offset=offset, causal=causal, window=window)] * G)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                          block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                          block_q_dq=bq, block_kv_dq=bk)
    return sa.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _check(q, k, v, window, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"splash_attention expects [B, T, H, D] arrays; got "
                         f"{q.shape=} {k.shape=} {v.shape=}")
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, S, Hkv, D] agreeing with q; got "
                         f"{q.shape=} {k.shape=} {v.shape=}")
    if Hq % Hkv:
        raise ValueError(f"query heads must be a multiple of kv heads (GQA); got {Hq=} {Hkv=}")
    if S < T:
        raise ValueError(f"need at least as many keys as queries; got {T=} {S=}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive int or None; got {window=}")
    if segment_ids is not None and (T != S or segment_ids.shape != (B, T)):
        raise ValueError(f"segment_ids must be [B, T] with T == S; got "
                         f"{segment_ids.shape=} {T=} {S=}")


def _local(q, k, v, segment_ids, *, causal, scale, window, block_q, block_k, interpret):
    """Single-device body: ``q [B, T, Hq, D]``, ``k, v [B, S, Hkv, D]`` -> ``[B, T, Hq, D]``."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq, bk = block_sizes(T, S, block_q, block_k)
    Tp = _round_up(T, bq)
    Sp = _round_up(S + (Tp - T), bk) if (Tp > T or S % bk) else S
    scale = D**-0.5 if scale is None else scale
    # [B, T, Hq, D] -> [B, Hkv, G, Tp, D]; [B, S, Hkv, D] -> [B, Hkv, Sp, D]
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4)
    qg = jnp.pad(qg, ((0, 0),) * 3 + ((0, Tp - T), (0, 0)))
    kt, vt = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
              for x in (k, v))
    seg_q = seg_k = None
    if segment_ids is not None or Tp > T or Sp > S:
        ids = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        seg_q = jnp.pad(ids, ((0, 0), (0, Tp - T)), constant_values=_PAD_ID)
        seg_k = (jnp.pad(ids, ((0, 0), (0, Sp - S)), constant_values=_PAD_ID) if T == S else
                 jnp.pad(jnp.zeros((B, S), jnp.int32), ((0, 0), (0, Sp - S)),
                         constant_values=_PAD_ID))
    kern = _kernel(Tp, Sp, G, S - T, bool(causal), None if window is None else int(window),
                   bq, bk, bool(interpret))

    def one(qb, kb, vb, sq, sk):  # one batch row: qb [Hkv, G, Tp, D], kb/vb [Hkv, Sp, D]
        seg = None if sq is None else sa.SegmentIds(q=sq, kv=sk)
        return jax.vmap(lambda qh, kh, vh: kern(qh, kh, vh, segment_ids=seg))(qb, kb, vb)

    o = jax.vmap(one)(qg, kt, vt, seg_q, seg_k)  # [B, Hkv, G, Tp, D]
    return o[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D).astype(q.dtype)


def _specs(q, k):
    """shard_map specs ``(q/o, k/v, segment_ids)`` from the active logical rules."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = shd.active_rules()
    q_spec = shd.logical_to_spec(("batch", None, "heads", None), rules, mesh, q.shape)
    kv_spec = shd.logical_to_spec(("batch", None, "kv_heads", None), rules, mesh, k.shape)
    if q_spec[0] != kv_spec[0] or q_spec[2] != kv_spec[2]:
        # q heads split differently from kv heads would break the GQA grouping per shard.
        q_spec = P(q_spec[0], None, None, None)
        kv_spec = P(q_spec[0], None, None, None)
    return q_spec, kv_spec, P(q_spec[0], None)


def splash_attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None,
                     block_q=512, block_k=512, interpret=False):
    """Exact attention by the Pallas TPU splash kernels; see the module docstring."""
    _check(q, k, v, window, segment_ids)
    if not interpret and not available():
        raise ValueError(
            f"impl='splash' runs Pallas TPU (Mosaic) kernels; the target platform is "
            f"{targets.platform()!r}. Use impl='flash' or 'auto', or "
            f"longctx.kernels.splash_attention.splash_attention(..., interpret=True) to run "
            f"the kernel in the Pallas interpreter")
    body = functools.partial(_local, causal=causal, scale=scale, window=window,
                             block_q=block_q, block_k=block_k, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
        return body(q, k, v, segment_ids)
    q_spec, kv_spec, seg_spec = _specs(q, k)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: body(q, k, v, None),
                             in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=False)(q, k, v)
    # check_vma=False: pallas_call outputs carry no varying-axes annotation.
    return jax.shard_map(body, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)
