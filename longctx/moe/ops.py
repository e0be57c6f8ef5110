"""Mixture-of-Experts math: routing, losses, the dispatch forms, a dense reference.

No Flax here: the layer is ``longctx.moe.layer.MoE``, the section
``longctx.moe.config.MoEConfig``.

Token choice (every token picks its k experts):

* ``route``: ``softmax_topk`` (softmax over experts, then top-k; optionally
  renormalised: GShard / Switch / DeepSeek-V2), ``topk_softmax`` (top-k logits,
  softmax over the k: Mixtral), ``sigmoid`` (per-expert sigmoid affinities:
  DeepSeek-V3). An optional selection-only bias (auxiliary-loss-free balancing,
  DeepSeek-V3 sec. 2.1.2) and group-limited routing (DeepSeek-V2 sec. 2.1.2).
* dispatch, every form with one signature ``(x, experts, weights, w_gate,
  w_up, w_down, ...)``:

  - ``capacity_moe``: GShard's one-hot dispatch / combine tensors (Lepikhin et
    al. 2020, sec. 3.2), ``C = ceil(capacity_factor * S * k / E)`` slots per
    expert *per sequence*; a slot that does not fit is dropped (the token keeps
    only its residual for that expert).
  - ``dropless_moe``: token-slots sorted by expert, then a grouped matmul --
    ``jax.lax.ragged_dot`` (native grouped GEMM on TPU / GPU) or ``blocks`` (the
    sorted slots padded per expert to blocks of ``m`` rows, each block one
    batched matmul with its expert's weights). On CPU ``ragged_dot`` lowers to
    a masked dense product over all E experts (E x the FLOPs), several times slower
    than ``blocks`` (``python -m experiments.bench_moe``); compiled for GPU, XLA's
    ``ragged_dot`` takes several times the temporary memory of ``blocks``. So ``impl="auto"``
    picks ``ragged_dot`` when compiling for TPU (Mosaic kernels) and ``blocks`` otherwise.
    Under a mesh the layer runs it on each device's own tokens (``local_dropless_moe``).
  - ``expert_parallel_moe``: experts sharded over the ``expert`` mesh axis and
    token buffers exchanged by ``jax.lax.all_to_all`` inside ``jax.shard_map``,
    with fixed-capacity buffers per destination (ragged all-to-all does not run
    on CPU): ``capacity_factor * local tokens * k`` rows of d_model per device.

* ``expert_choice_moe`` (Zhou et al. 2022): experts pick their top tokens. It
  looks at the whole sequence, so in a causal LM it leaks the future; the
  config refuses it unless ``acknowledge_expert_choice_leaks``.

Causality of capacity dispatch. Capacity is a shared resource, so who gets a
slot must not depend on the future. Capacity is counted per *sequence* (one
group per batch row) and slots are claimed in position order
(cumsum over ``(position, slot)``): a token's keep/drop depends only on tokens
at earlier positions of its own sequence -- never on later tokens, and never on
other sequences of the batch (so results do not depend on batch composition,
and expert parallelism over batch shards gives the same drops as one device).
Counting over the flattened ``batch * time`` instead would let earlier rows'
later tokens take capacity from this row's earlier tokens; counting slot-major
(all first choices, then all second choices, as GShard) would let a later
token's first choice push out an earlier token's second choice.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longctx import targets
from longctx.moe.config import DROPLESS_IMPLS, ROUTERS, MoEConfig
from longctx.parallel import sharding as shd

log = logging.getLogger(__name__)
_LOGGED: set = set()


# ----------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------


class Routing(NamedTuple):
    experts: jax.Array  # [..., k] int32: the chosen experts, distinct per token
    weights: jax.Array  # [..., k] float32: combine weights (routed_scaling_factor applied)
    probs: jax.Array  # [..., E] float32: router probabilities P (load-balance loss)


def route(logits, *, k: int, router: str = "softmax_topk", bias=None,
          norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0,
          n_groups: int = 1, topk_groups: int = 1) -> Routing:
    """Token-choice top-k routing of ``logits [..., E]``.

    ``bias [E]`` shifts only which experts are *selected* (the combine weights
    come from the unbiased scores), as DeepSeek-V3's auxiliary-loss-free
    balancing. ``n_groups > 1``: experts form ``n_groups`` equal groups, each
    token keeps its ``topk_groups`` best groups (group score: the sum of its two
    best scores for ``sigmoid`` as DeepSeek-V3, its best score otherwise as
    DeepSeek-V2) and picks its k experts inside them.
    """
    logits = logits.astype(jnp.float32)
    if router == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, -1, keepdims=True)  # normalised affinities
    elif router in ("softmax_topk", "topk_softmax"):
        scores = probs = jax.nn.softmax(logits, -1)
    else:
        raise ValueError(f"{router=}; expected one of {ROUTERS}")
    select = logits if router == "topk_softmax" else scores
    if bias is not None:
        select = select + bias.astype(jnp.float32)
    if n_groups > 1:
        select = _limit_groups(select, n_groups, topk_groups, sum_top2=router == "sigmoid")
    _, experts = jax.lax.top_k(select, k)  # ties: the lower expert index first
    if router == "topk_softmax":
        weights = jax.nn.softmax(jnp.take_along_axis(logits, experts, -1), -1)
    else:
        weights = jnp.take_along_axis(scores, experts, -1)
        if norm_topk_prob:
            weights = weights / jnp.sum(weights, -1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights * routed_scaling_factor, probs)


def _limit_groups(select, n_groups: int, topk_groups: int, *, sum_top2: bool):
    """Mask (to -inf) the experts outside each token's ``topk_groups`` best groups."""
    *lead, E = select.shape
    g = select.reshape(*lead, n_groups, E // n_groups)
    if sum_top2:
        group_score = jnp.sum(jax.lax.top_k(g, min(2, E // n_groups))[0], -1)
    else:
        group_score = jnp.max(g, -1)
    _, top = jax.lax.top_k(group_score, topk_groups)  # [..., topk_groups]
    keep = jnp.any(top[..., :, None] == jnp.arange(n_groups), axis=-2)  # [..., n_groups]
    return jnp.where(keep[..., None], g, -jnp.inf).reshape(select.shape)


# ----------------------------------------------------------------------------
# Losses and statistics (global over the batch: under jit with sharded inputs
# these means are global; inside shard_map they are reduced with pmean)
# ----------------------------------------------------------------------------


def expert_counts(experts, num_experts: int):
    """Token-slots routed to each expert: ``[..., k] -> [E]`` float32."""
    oh = jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.float32)
    return jnp.sum(oh, 0)


def load_balance_loss(probs, experts):
    """Switch Transformer load-balance loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    ``f_i``: fraction of tokens that chose expert i (over all k slots, so the f_i
    sum to k); ``P_i``: mean router probability of expert i. Uniform
    probabilities give exactly k whatever the choice; its minimum under
    balanced routing is k.
    """
    E = probs.shape[-1]
    n_tokens = math.prod(experts.shape[:-1])
    f = expert_counts(experts, E) / n_tokens
    P_mean = jnp.mean(probs.reshape(-1, E).astype(jnp.float32), 0)
    return E * jnp.sum(f * P_mean)


def router_z_loss(logits):
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` (Zoph et al. 2022, eq. 5)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), -1)))


# ----------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------


def expert_swiglu(xe, w_gate, w_up, w_down):
    """Every expert on its own rows: ``xe [E, M, D] -> [E, M, D]`` (w_gate/w_up [E, D, F],
    w_down [E, F, D])."""
    dt = xe.dtype
    gate = jnp.einsum("emd,edf->emf", xe, w_gate.astype(dt))
    up = jnp.einsum("emd,edf->emf", xe, w_up.astype(dt))
    return jnp.einsum("emf,efd->emd", jax.nn.silu(gate) * up, w_down.astype(dt))


def moe_reference(x, experts, weights, w_gate, w_up, w_down):
    """Readable reference: every expert on every token, combined with a dense weight matrix.

    ``x [N, D]``, ``experts / weights [N, k]`` -> ``[N, D]``. E x the FLOPs; for tests.
    """
    E = w_gate.shape[0]
    dense_w = jnp.einsum("nke,nk->ne", jax.nn.one_hot(experts, E, dtype=x.dtype),
                         weights.astype(x.dtype))  # [N, E]
    ye = expert_swiglu(jnp.broadcast_to(x, (E, *x.shape)), w_gate, w_up, w_down)  # [E, N, D]
    return jnp.einsum("ne,end->nd", dense_w, ye)


# ----------------------------------------------------------------------------
# Dispatch (a): capacity, GShard one-hot dispatch / combine tensors
# ----------------------------------------------------------------------------


def expert_capacity(group_size: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert and group: ``ceil(capacity_factor * group_size * k / E)``.

    ``capacity_factor <= 0`` (dropless): ``group_size``, the most any expert can
    receive (a token picks an expert at most once). Never more than that.
    """
    if capacity_factor <= 0:
        return group_size
    return max(1, min(group_size, math.ceil(capacity_factor * group_size * k / num_experts)))


def capacity_tensors(experts, weights, num_experts: int, capacity: int, dtype=jnp.float32):
    """GShard dispatch / combine tensors for groups of tokens.

    ``experts / weights [G, S, k]`` -> ``dispatch [G, S, E, C]`` (0/1),
    ``combine [G, S, E, C]`` (the routing weight where dispatched), ``keep [G, S, k]``.
    Slots are claimed in the order (position, slot): the cumsum over the
    flattened ``S * k`` axis gives each token-slot its place in its expert's
    buffer, so a token's place depends only on earlier positions of its group.
    """
    G, S, k = experts.shape
    oh = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32)  # [G, S, k, E]
    pos = jnp.cumsum(oh.reshape(G, S * k, num_experts), axis=1).reshape(oh.shape) - 1
    pos = jnp.sum(pos * oh, -1)  # [G, S, k]: place in the chosen expert's buffer
    keep = pos < capacity
    slot = jax.nn.one_hot(jnp.where(keep, pos, capacity), capacity, dtype=dtype)  # dropped: 0
    oh = oh.astype(dtype)
    dispatch = jnp.einsum("gske,gskc->gsec", oh, slot)
    combine = jnp.einsum("gske,gskc,gsk->gsec", oh, slot, weights.astype(dtype))
    return dispatch, combine, keep


def capacity_slots(experts, num_experts: int, capacity: int):
    """Buffer places of capacity dispatch, by index (no one-hot ``[S, E, C]`` tensors).

    ``experts [G, S, k]`` -> ``(dest [G, S, k], keep [G, S, k], src [G, E * C],
    valid [G, E * C])``: token-slot ``(s, j)`` goes to row ``dest = e * C + place`` of
    its group's ``[E * C]`` buffer (``place``: its rank among the group's slots of
    expert ``e`` in (position, slot) order, as :func:`capacity_tensors`); it is kept
    iff ``place < C`` (``dest`` of a dropped slot: 0, with ``keep`` false). Buffer row
    ``r`` holds token ``src[r]`` where ``valid[r]`` (an empty row: ``valid`` false).
    Memory: ``O(S * k + E * C)`` integers per group, from one stable sort.
    """
    G, S, k = experts.shape
    E, C, M = num_experts, capacity, S * k

    def one(flat):  # [M] experts of one group, slot m = (position m // k, choice m % k)
        order = jnp.argsort(flat, stable=True)  # by expert; (position, slot) order inside
        sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        starts = jnp.cumsum(sizes) - sizes
        place_sorted = jnp.arange(M, dtype=jnp.int32) - starts[flat[order]]
        place = jnp.zeros((M,), jnp.int32).at[order].set(place_sorted, unique_indices=True)
        keep = place < C
        dest = jnp.where(keep, flat * C + place, 0)
        c = jnp.arange(C, dtype=jnp.int32)
        valid = c[None, :] < jnp.minimum(sizes, C)[:, None]  # [E, C]
        src = order[jnp.minimum(starts[:, None] + c[None, :], M - 1)] // k
        return dest, keep, jnp.where(valid, src, 0).reshape(E * C), valid.reshape(E * C)

    dest, keep, src, valid = jax.vmap(one)(experts.reshape(G, M).astype(jnp.int32))
    return dest.reshape(G, S, k), keep.reshape(G, S, k), src, valid


def dispatch_rows(x, src, valid):
    """``x [G, S, D]`` -> the buffers ``[G, R, D]``: row r of group g is ``x[g, src[g, r]]``,
    zero where not ``valid`` (the transpose, in the backward, is a scatter-add)."""
    buf = jnp.take_along_axis(x, src[..., None], axis=1)
    return jnp.where(valid[..., None], buf, jnp.zeros((), x.dtype))


def combine_rows(ye, dest, keep, weights):
    """``ye [G, R, D]`` (expert outputs by buffer row) -> ``y [G, S, D] = sum_j w[s, j] *
    ye[dest[s, j]]`` over the kept slots (a dropped slot adds 0 and gets no gradient)."""
    G, S, k = dest.shape
    rows = jnp.take_along_axis(ye, dest.reshape(G, S * k)[..., None], axis=1)
    w = jnp.where(keep, weights, 0).astype(ye.dtype)
    return jnp.einsum("gskd,gsk->gsd", rows.reshape(G, S, k, ye.shape[-1]), w)


def capacity_moe(x, experts, weights, w_gate, w_up, w_down, *, capacity: int):
    """Capacity dispatch: ``x [G, S, D]``, ``experts / weights [G, S, k]`` -> ``(y [G, S, D],
    keep [G, S, k])``; a dropped slot contributes 0 (the residual carries the token).
    GShard's dispatch / combine (:func:`capacity_tensors`), by index: buffers of
    ``E * C`` rows per group and ``S * k`` combined rows, never ``S * E * C`` entries."""
    G, S, D = x.shape
    E = w_gate.shape[0]
    dest, keep, src, valid = capacity_slots(experts, E, capacity)
    xe = dispatch_rows(x, src, valid).reshape(G, E, capacity, D)
    xe = jnp.swapaxes(xe, 0, 1).reshape(E, G * capacity, D)
    ye = expert_swiglu(xe, w_gate, w_up, w_down).reshape(E, G, capacity, D)
    ye = jnp.swapaxes(ye, 0, 1).reshape(G, E * capacity, D)
    return combine_rows(ye, dest, keep, weights), keep


# ----------------------------------------------------------------------------
# Dispatch (b): dropless, token-slots sorted by expert + grouped matmul
# ----------------------------------------------------------------------------


def default_block_size(n_slots: int, num_experts: int) -> int:
    """Rows per block of the ``blocks`` grouped matmul: about an eighth of an expert's
    balanced share (padding costs at most ``E * (m - 1)`` rows, ~1/8 extra), a power
    of two in [8, 256]."""
    share = max(1, n_slots // (8 * num_experts))
    return int(min(256, max(8, 2 ** int(math.log2(share)))))


def dropless_moe(x, experts, weights, w_gate, w_up, w_down, *, impl: str = "auto",
                 block_size: int | None = None):
    """Dropless dispatch: ``x [N, D]``, ``experts / weights [N, k]`` -> ``y [N, D]``.

    The ``N * k`` token-slots are sorted by expert (stable: token order inside
    an expert) into a buffer, the experts run as one grouped matmul over it, and
    each slot reads its row back. ``impl``: ``ragged_dot`` (buffer = the sorted
    slots, ``jax.lax.ragged_dot`` with the group sizes), ``blocks`` (each
    expert's rows padded to a multiple of ``block_size``; block b is a batched
    matmul with the weights of its expert), ``auto`` (``blocks`` on CPU where it
    is faster, and on GPU, where XLA's ``ragged_dot`` needed far more temporary memory than
    ``blocks`` for the Qwen3-30B-A3B shape compiled for an H100 host (docs/results/targets.md);
    ``ragged_dot`` on TPU (Mosaic's grouped-matmul kernels); by the platform compiled for).
    """
    N, k = experts.shape
    D = x.shape[-1]
    E = w_gate.shape[0]
    if impl == "auto":
        where = targets.platform()
        impl = "ragged_dot" if where == "tpu" else "blocks"
        if (impl, where) not in _LOGGED:  # every automatic choice is logged once, with its reason
            _LOGGED.add((impl, where))
            log.info("dropless MoE impl=auto chose %s on %s (%s)", impl, where,
                     "Mosaic's grouped-matmul kernels" if impl == "ragged_dot" else
                     "XLA lowers ragged_dot to far larger buffers here (see dropless_moe)")
    flat = experts.reshape(-1)  # [N*k] slot s = (token s // k, choice s % k)
    M = flat.shape[0]
    order = jnp.argsort(flat, stable=True)  # slots sorted by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # [E] group sizes
    if impl == "ragged_dot":
        rows, dest_sorted = M, jnp.arange(M, dtype=jnp.int32)
    elif impl == "blocks":
        e_sorted = flat[order]
        rank = jnp.arange(M, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[e_sorted]  # in expert
        m = block_size or default_block_size(M, E)
        padded = (sizes + m - 1) // m * m
        ends = jnp.cumsum(padded)
        dest_sorted = (ends - padded)[e_sorted] + rank
        n_blocks = (M + E * (m - 1)) // m  # static bound on sum_e ceil(size_e / m)
        rows = n_blocks * m
    else:
        raise ValueError(f"{impl=}; expected one of {DROPLESS_IMPLS}")
    dest = jnp.zeros((M,), jnp.int32).at[order].set(dest_sorted, unique_indices=True)  # [N*k]
    buf = jnp.zeros((rows, D), x.dtype).at[dest].set(jnp.repeat(x, k, axis=0),
                                                     unique_indices=True)  # [rows, D]
    dt = x.dtype
    if impl == "ragged_dot":
        def mm(a, w):
            return jax.lax.ragged_dot(a, w.astype(dt), sizes)
        yb = mm(jax.nn.silu(mm(buf, w_gate)) * mm(buf, w_up), w_down)  # [M, D]
    else:
        block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n_blocks) * m,
                                                    side="right"), E - 1)  # [n_blocks]
        xb = buf.reshape(n_blocks, m, D)
        wg, wu, wd = (w[block_expert].astype(dt) for w in (w_gate, w_up, w_down))
        h = jax.nn.silu(jnp.einsum("bmd,bdf->bmf", xb, wg)) * jnp.einsum("bmd,bdf->bmf", xb, wu)
        yb = jnp.einsum("bmf,bfd->bmd", h, wd).reshape(rows, D)
    y_slots = yb.at[dest].get(unique_indices=True).reshape(N, k, D)
    return jnp.einsum("nkd,nk->nd", y_slots, weights.astype(dt))


def local_dropless_moe(x, experts, weights, w_gate, w_up, w_down, *, impl: str = "auto"):
    """:func:`dropless_moe` on each device's own tokens: ``x [B, S, D]``, ``experts /
    weights [B, S, k]`` -> ``y [B, S, D]``.

    Under a mesh (``jax.set_mesh``) whose batch / length axes split the tokens, the sort,
    the buffers and the grouped matmul run inside ``jax.shard_map`` on the local
    token-slots, with the expert weights gathered whole in the compute dtype (FSDP; their
    gradient is reduced over the token axes). Left to GSPMD, the global sort over the
    flattened ``B * S * k`` slots gathered every device's tokens (and split the grouped
    matmul over ``d_model``, the parameters' fsdp dimension): buffers of the global
    token-slots on every device. Without a mesh, or with the tokens on one device: plain
    :func:`dropless_moe`.
    """
    B, S, D = x.shape
    k = experts.shape[-1]

    def flat(x, experts, weights, w_gate, w_up, w_down):
        b, s, _ = x.shape
        return dropless_moe(x.reshape(b * s, D), experts.reshape(b * s, k),
                            weights.reshape(b * s, k), w_gate, w_up, w_down,
                            impl=impl).reshape(b, s, D)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return flat(x, experts, weights, w_gate, w_up, w_down)
    tok = shd.logical_to_spec(("batch", "length", None), shd.active_rules(), mesh, x.shape)
    if all(part is None for part in tok):
        return flat(x, experts, weights, w_gate, w_up, w_down)
    w = tuple(a.astype(x.dtype) for a in (w_gate, w_up, w_down))
    return jax.shard_map(flat, in_specs=(tok, tok, tok, P(), P(), P()),
                         out_specs=tok)(x, experts, weights, *w)


# ----------------------------------------------------------------------------
# Expert choice (leaks the future in a causal LM; refused by the config unless acknowledged)
# ----------------------------------------------------------------------------


def expert_choice_moe(x, probs, w_gate, w_up, w_down, *, capacity: int):
    """Expert-choice routing (Zhou et al. 2022): each expert takes the ``capacity`` tokens
    of the group with the highest router probability. ``x [G, S, D]``, ``probs [G, S, E]``
    -> ``(y [G, S, D], chosen [G, S])``. A token's output depends on the scores of
    every token of its group, later ones included."""
    G, S, D = x.shape
    E = probs.shape[-1]
    gate, idx = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [G, E, C]
    dispatch = jax.nn.one_hot(idx, S, dtype=x.dtype)  # [G, E, C, S]
    xe = jnp.einsum("gecs,gsd->egcd", dispatch, x).reshape(E, G * capacity, D)
    ye = expert_swiglu(xe, w_gate, w_up, w_down).reshape(E, G, capacity, D)
    y = jnp.einsum("gecs,gec,egcd->gsd", dispatch, gate.astype(x.dtype), ye)
    return y, jnp.sum(dispatch, axis=(1, 2)) > 0


# ----------------------------------------------------------------------------
# Expert parallelism: all-to-all inside shard_map
# ----------------------------------------------------------------------------


def expert_parallel_active(cfg: MoEConfig) -> bool:
    """``expert_parallel`` is on and the active mesh (``jax.set_mesh``) has ``expert > 1``."""
    if not cfg.expert_parallel:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and dict(mesh.shape).get("expert", 1) > 1


def expert_parallel_moe(x, experts, weights, w_gate, w_up, w_down, *,
                        capacity_factor: float):
    """Capacity dispatch with experts sharded over the ``expert`` mesh axis.

    ``x [B, S, D]``, ``experts / weights [B, S, k]`` (sharded over the batch
    axes, which must include ``expert``) -> ``(y [B, S, D], dropped fraction)``.
    Per device: its local rows are the groups, each with ``C`` slots per expert
    (:func:`expert_capacity` of the local sequence length); the dispatch buffer
    ``[rows, X, E / X, C, D]`` (:func:`capacity_slots`, by index) is split by
    destination shard and exchanged with ``all_to_all`` (fixed-size buffers: ragged
    all-to-all does not run on CPU), each device runs its ``E / X`` experts on the
    tokens of all X sources, a second ``all_to_all`` returns the outputs, and the
    combine is local. The buffers are ``E * C = capacity_factor * S * k`` rows per
    local sequence: the device's own routed tokens times the capacity factor, whatever
    the global batch. ``capacity_factor <= 0`` (dropless) uses ``C = S``, which never
    drops but makes the buffers ``E / k`` times the routed tokens (384 experts, k 8:
    48x; too large for long sequences: give a capacity factor there). With whole
    sequences on each device (``sequence`` axis 1) the groups, hence the drops, are
    those of single-device ``capacity_moe``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    X = dict(mesh.shape)["expert"]
    E, k = w_gate.shape[0], experts.shape[-1]
    if E % X:
        raise ValueError(f"expert parallelism: num_experts={E} must be divisible by the "
                         f"expert mesh axis size {X}")
    rules = shd.active_rules()
    tok = shd.logical_to_spec(("batch", "length", None), rules, mesh, x.shape)
    token_axes = tuple(a for part in tok[:2] if part is not None
                       for a in ((part,) if isinstance(part, str) else part))
    if "expert" not in token_axes:
        raise ValueError(f"expert parallelism needs the tokens split over the expert mesh axis; "
                         f"x {x.shape} gets token spec {tok} (batch must be divisible by the "
                         f"product of the batch mesh axes {rules.get('batch')})")
    sizes = dict(mesh.shape)
    Bl, Sl, D = (n // math.prod(sizes[a] for a in ((p,) if isinstance(p, str) else p or ()))
                 for n, p in zip(x.shape, tok))
    C = expert_capacity(Sl, k, E, capacity_factor)
    key = ("expert_parallel", Bl, Sl, E, C, X)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("expert-parallel MoE: %d local sequence(s) of %d tokens, %d experts over "
                 "expert=%d, capacity %d slots per expert and sequence (capacity_factor %s): "
                 "dispatch buffer %d rows of d_model %d per device", Bl, Sl, E, X, C,
                 capacity_factor, Bl * E * C, D)

    def local(x, experts, weights, w_gate, w_up, w_down):
        Bl, Sl, D = x.shape
        El = w_gate.shape[0]
        dest, keep, src, valid = capacity_slots(experts, E, C)
        xe = dispatch_rows(x, src, valid).reshape(Bl, X, El * C, D)
        xe = jax.lax.all_to_all(xe, "expert", 1, 1, tiled=True)  # [Bl, X sources, El*C, D]
        xe = xe.reshape(Bl, X, El, C, D)
        gate = jnp.einsum("bxecd,edf->bxecf", xe, w_gate)
        up = jnp.einsum("bxecd,edf->bxecf", xe, w_up)
        ye = jnp.einsum("bxecf,efd->bxecd", jax.nn.silu(gate) * up, w_down)
        ye = jax.lax.all_to_all(ye.reshape(Bl, X, El * C, D), "expert", 1, 1,
                                tiled=True)  # [Bl, X expert shards, El*C, D]
        y = combine_rows(ye.reshape(Bl, E * C, D), dest, keep, weights)
        dropped = jax.lax.pmean(jnp.mean((~keep).astype(jnp.float32)), token_axes)
        return y, dropped

    w_spec = P("expert", None, None)
    # The expert weights cross the mesh (gathered over the axes other than `expert`) in the
    # compute dtype, not in the float32 of the parameters.
    w = tuple(a.astype(x.dtype) for a in (w_gate, w_up, w_down))
    return jax.shard_map(local, in_specs=(tok, tok, tok, w_spec, w_spec, w_spec),
                         out_specs=(tok, P()))(x, experts, weights, *w)
