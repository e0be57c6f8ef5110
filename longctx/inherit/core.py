"""A child model that inherits a chosen fraction of a parent's parameters.

    child = longctx.inherit(parent, child_cfg.model, ratio=0.5, method="interpolate",
                            rngs=nnx.Rngs(0))

The fresh part is exactly ``build_model(child_cfg, rngs=rngs)``; the parent's parameters
reach it through the **per-layer view** (:mod:`longctx.model.layout`), so this module never
indexes ``model.blocks`` and works unchanged when the layers are stacked for ``lax.scan``.

Methods
-------
``interpolate`` (default; shrink-and-perturb, Ash & Adams 2020): every *mapped* child
parameter is ``ratio * target + (1 - ratio) * fresh`` (``target`` the parent's tensor
after the rule of the table below), every unmapped one stays fresh. ``ratio=1`` with the
same architecture is the parent exactly; ``ratio=0`` is the fresh model exactly. When the
depths differ, child layer ``i`` takes parent layer ``layer_source(i)`` (evenly spaced).

``layers``: the child inherits ``k = floor(ratio * n_child + 1/2)`` whole layers, copied
(no interpolation), at child indices ``floor(j (n_child - 1) / (k - 1) + 1/2)``,
``j = 0..k-1`` (evenly spaced, first and last included; ``k = 1``: layer 0); child layer
``i`` takes parent layer ``floor(i (n_parent - 1) / (n_child - 1) + 1/2)`` (growth repeats
parent layers, shrinking skips some). The other layers stay fresh. The non-layer
parameters (embedding, final norm, LM head, stack wrapper) are copied when ``k >= 1``
and fresh when ``k = 0``, so ``ratio=0`` is the fresh model.

Distillation (``method="distill"`` of the issue) is a training loss, not an
initialisation: :mod:`longctx.train.distill` and the ``inherit`` config section; it
combines with either method here.

Correspondence table (child parameter <- parent parameter, per layer ``i <- j``)
--------------------------------------------------------------------------------
======================================  ==========================================  ============
child (per-layer view path)             from the parent                             rule
======================================  ==========================================  ============
same path, same shape                   the same path                               ``copy``
``embed``, ``final_norm``, norms, FFN   same path (any backend pair)                ``copy``
mixer ``wq``, ``wo``                    ``full``/``recurrent``/``linear`` same name  ``copy``
mixer ``wk``, ``wv`` ``[E, H, D]``      ``[E, Hkv, D]`` (GQA parent, MHA child),    ``repeat_kv``
(and ``conv_k``, ``conv_v``)
                                        each kv head repeated ``H / Hkv`` times
                                        (query head ``h`` used kv head ``h // G``)
mixer ``conv_q/k/v`` (linear child)     parent's kernel if it has one, else the     ``copy`` /
                                        identity kernel (last tap 1: the layer      ``identity``
                                        starts with the parent's projections)
mixer ``w_a`` (gated DeltaNet decay)    ``mean_d wk[:, h, d]``: the decay input is  ``liger``
                                        the mean-pooled key (Liger, Lan et al.
                                        2025: gates built from the key projection)
mixer ``hedgehog_q/k`` ``[H, K, K]``    nothing (parent without a learned map): the ``hedgehog``
(``feature_map: hedgehog``)             identity, ``phi = softmax([x, -x])`` on the
                                        parent's q, k (Hedgehog, Zhang et al. 2024;
                                        LoLCATs 2025: start from the identity, then
                                        learn to mimic softmax attention)
``lm_head`` (untied child)              ``embed.embedding.T`` (tied parent)         ``untie``
mlp ``w_gate/w_up/w_down`` ``[X, ...]`` dense ``[...]`` (dense -> MoE upcycling,    ``upcycle``
                                        Komatsuzaki et al. 2022): every expert the
                                        dense MLP (``+ noise_std std(w) N(0,1)``)
same, ``expert_dim = mlp_dim / s``      expert ``e`` = slice ``e mod s`` of the     ``split``
(``split=True``)                        dense hidden dim (fine-grained upcycling)
everything else (``w_beta``, ``a_log``, nothing: fresh (their own inits: Mamba-2's  fresh
``dt_bias``, ``norm_scale``,            A / dt, ones, ...); the recurrent memory
``w_out_gate``, GLA gate, recurrent     gates start at 0 (half memory), MoE router
``mem_gate``/``knn_gate``, router,      and shared experts random
shared experts, memory tokens)
======================================  ==========================================  ============

Not implemented: LoLCATs' attention-transfer stage (training the feature maps to match the
parent's softmax attention before fine-tuning; here they start at the identity and train
with the rest), and a start-at-zero memory gate for ``recurrent`` children (no literature
init; the mixer's own constant is kept). Parameters that have a path in both models but
shapes no rule maps (a different ``d_model``, ``head_dim``, ``vocab_size``, ``mlp_dim``)
raise ``ValueError`` naming the path and both shapes; parent parameters with no place in
the child (layers dropped by shrinking, recurrent gates into ``full``) are simply unused
(see :func:`correspondence`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.config import ModelConfig
from longctx.model import build_model
from longctx.model.layout import from_per_layer, to_per_layer

METHODS = ("interpolate", "layers")
KV_PARAMS = ("wk", "wv", "conv_k", "conv_v")  # kv-head tensors: repeated GQA -> MHA
LAYERS = "blocks"  # the per-layer view's key of the layer list (longctx.model.layout)


@dataclass(frozen=True)
class Mapped:
    """One child parameter and where its target came from."""

    child: str  # "blocks/3/mixer/wk"
    parent: str | None  # "blocks/1/mixer/wk"; None for a rule without a parent tensor
    rule: str  # copy | repeat_kv | identity | liger | hedgehog | untie | upcycle | split


def _round(x: float) -> int:
    """Round half up (Python's ``round`` rounds half to even)."""
    return int(np.floor(x + 0.5))


def layer_source(i: int, n_child: int, n_parent: int) -> int:
    """The parent layer that child layer ``i`` takes: evenly spaced, first and last kept."""
    if n_child == 1:
        return 0
    return _round(i * (n_parent - 1) / (n_child - 1))


def inherited_layers(ratio: float, n_child: int) -> list[int]:
    """``method="layers"``: the child layers that are inherited (module docstring)."""
    k = _round(ratio * n_child)
    if k == 0:
        return []
    if k == 1:
        return [0]
    return [_round(j * (n_child - 1) / (k - 1)) for j in range(k)]


def params_of(model) -> dict:
    """The per-layer view of ``model``'s parameters (pure dict of arrays)."""
    return to_per_layer(model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _flat(tree: dict, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflat(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def _name(path) -> str:
    return "/".join(map(str, path))


def _shape_rule(name: str, value, shape, pcfg: ModelConfig, ccfg: ModelConfig, *,
                split: bool, noise, where):
    """The parent tensor ``value`` mapped onto a child tensor of ``shape``: (target, rule)."""
    if value.shape == tuple(shape):
        return value, "copy"
    ps, cs = value.shape, tuple(shape)
    if len(ps) == len(cs):
        diff = [a for a in range(len(ps)) if ps[a] != cs[a]]
        if (len(diff) == 1 and ps[diff[0]] == pcfg.n_kv_heads and cs[diff[0]] == ccfg.n_heads
                and cs[diff[0]] % ps[diff[0]] == 0 and name.endswith(KV_PARAMS)):
            return jnp.repeat(value, cs[diff[0]] // ps[diff[0]], axis=diff[0]), "repeat_kv"
    E = ccfg.moe.num_experts
    if len(cs) == len(ps) + 1 and E and cs[0] == E:
        if cs[1:] == ps:
            experts = jnp.broadcast_to(value, cs)
            rule = "upcycle"
        else:
            diff = [a for a in range(len(ps)) if ps[a] != cs[1 + a]]
            if not (split and len(diff) == 1 and ps[diff[0]] % cs[1 + diff[0]] == 0):
                raise ValueError(
                    f"inherit: {where} has shape {ps} in the parent and {cs} in the child: "
                    f"the experts' width {cs[1 + diff[0]] if len(diff) == 1 else '?'} differs "
                    f"from the dense width" + ("" if split else
                                               " (split=True cuts the dense MLP into experts)"))
            a, f = diff[0], cs[1 + diff[0]]
            s = ps[a] // f  # pieces of the dense hidden dim
            pieces = [jax.lax.slice_in_dim(value, (e % s) * f, (e % s + 1) * f, axis=a)
                      for e in range(E)]
            experts, rule = jnp.stack(pieces), "split"
        if noise is not None:
            experts = experts + noise(cs) * jnp.std(value)
        return experts, rule
    raise ValueError(f"inherit: {where} has shape {ps} in the parent and {cs} in the child; "
                     "no rule maps them (same shape, GQA kv-head repeat, dense -> experts)")


def _derived(rel: tuple, shape, parent_layer: dict, pcfg, ccfg):
    """Targets of child layer parameters without a parent counterpart: (target, rule, src)."""
    leaf = rel[-1]
    mixer = parent_layer.get("mixer", {})
    if rel[0] == "mixer" and leaf in ("conv_q", "conv_k", "conv_v"):
        W = shape[0]  # identity depthwise kernel: the output at t is the input at t
        return jnp.zeros(shape, jnp.float32).at[W - 1].set(1.0), "identity", None
    if rel[0] == "mixer" and leaf in ("hedgehog_q", "hedgehog_k"):
        H, K, F = shape  # Hedgehog / LoLCATs: the learned map starts at the identity
        eye = jnp.broadcast_to(jnp.eye(K, F, dtype=jnp.float32), (H, K, F))
        return eye, "hedgehog", None
    if rel[0] == "mixer" and leaf == "w_a" and "wk" in mixer:
        wk = mixer["wk"]  # [E, Hkv, D]
        H = shape[1]
        if wk.shape[0] == shape[0] and H % wk.shape[1] == 0:
            wk = jnp.repeat(wk, H // wk.shape[1], axis=1)
            return jnp.mean(wk, axis=-1), "liger", ("mixer", "wk")
    return None


def _pair_targets(P: dict, C: dict, pcfg, ccfg, layer_map: dict, top: bool, *, split,
                  noise) -> dict:
    """Child flat path -> (target, Mapped) for every mapped child parameter."""
    out = {}
    Pf = _flat({k: v for k, v in P.items() if k != LAYERS})
    Cf = _flat({k: v for k, v in C.items() if k != LAYERS})
    if top:
        for path, fresh in Cf.items():
            if path in Pf:
                t, rule = _shape_rule(_name(path), Pf[path], fresh.shape, pcfg, ccfg,
                                      split=split, noise=noise, where=_name(path))
                out[path] = (t, Mapped(_name(path), _name(path), rule))
            elif path == ("lm_head",) and ("embed", "embedding") in Pf:
                t = Pf[("embed", "embedding")].T
                if t.shape == fresh.shape:
                    out[path] = (t, Mapped("lm_head", "embed/embedding", "untie"))
    for i, j in layer_map.items():
        pl, cl = P[LAYERS][j], C[LAYERS][i]
        pf = _flat(pl)
        for rel, fresh in _flat(cl).items():
            cpath = (LAYERS, i) + rel
            if rel in pf:
                ppath = _name((LAYERS, j) + rel)
                t, rule = _shape_rule(_name(rel), pf[rel], fresh.shape, pcfg, ccfg,
                                      split=split, noise=noise,
                                      where=f"{_name(cpath)} (from {ppath})")
                out[cpath] = (t, Mapped(_name(cpath), ppath, rule))
                continue
            d = _derived(rel, fresh.shape, pl, pcfg, ccfg)
            if d is not None:
                t, rule, src = d
                out[cpath] = (t, Mapped(_name(cpath),
                                        None if src is None else _name((LAYERS, j) + src), rule))
    return out


def _check(ratio, method):
    if not (isinstance(ratio, (int, float)) and 0.0 <= float(ratio) <= 1.0):
        raise ValueError(f"inherit: ratio={ratio!r} must be a number in [0, 1]")
    if method not in METHODS:
        raise ValueError(f"inherit: method={method!r}; expected one of {METHODS} "
                         "(distillation is the trainer's `inherit` config section)")


def _plan(pcfg: ModelConfig, ccfg: ModelConfig, ratio: float, method: str):
    """(layer map child -> parent, whether the top-level parameters are inherited)."""
    if pcfg.vocab_size != ccfg.vocab_size:
        raise ValueError(f"inherit: the parent's vocab_size={pcfg.vocab_size} differs from "
                         f"the child's vocab_size={ccfg.vocab_size}; they must be equal")
    nc, np_ = ccfg.n_layers, pcfg.n_layers
    if method == "interpolate":
        return {i: layer_source(i, nc, np_) for i in range(nc)}, True
    layers = inherited_layers(ratio, nc)
    return {i: layer_source(i, nc, np_) for i in layers}, bool(layers)


def correspondence(parent, child_cfg: ModelConfig, *, ratio: float = 1.0,
                   method: str = "interpolate", split: bool = False) -> list[Mapped]:
    """What :func:`inherit` maps: one :class:`Mapped` per inherited child parameter.

    Built on abstract shapes (nothing is computed); the child's unmapped parameters stay
    fresh, the parent's unused ones are the complement of ``{m.parent}``.
    """
    _check(ratio, method)
    layer_map, top = _plan(parent.cfg, child_cfg, ratio, method)
    C = jax.eval_shape(lambda: params_of(build_model(child_cfg, rngs=nnx.Rngs(0))))
    found: list[Mapped] = []

    def trace(P):  # abstract: the rules run on shapes only
        out = _pair_targets(P, C, parent.cfg, child_cfg, layer_map, top, split=split,
                            noise=None)
        found.extend(m for _, m in out.values())

    jax.eval_shape(trace, params_of(parent))
    return found


def inherit(parent, child_cfg: ModelConfig, *, ratio: float, method: str = "interpolate",
            rngs: nnx.Rngs, noise_std: float = 0.0, split: bool = False):
    """A child of ``parent`` built from ``child_cfg`` that inherits ``ratio`` of it.

    ``parent``: a built model (its config ``parent.cfg``); ``child_cfg``: the child's
    ``ModelConfig`` (any backends / pattern / depth / MoE, same vocabulary);
    ``ratio`` in [0, 1]; ``method``: ``interpolate`` | ``layers`` (module docstring);
    ``rngs``: the fresh part is exactly ``build_model(child_cfg, rngs=rngs)`` (then, with
    ``noise_std > 0``, upcycled experts draw their noise from ``rngs.params()``);
    ``split``: cut the dense MLP into fine-grained experts when ``expert_dim < mlp_dim``.
    Returns the child model.
    """
    _check(ratio, method)
    ratio = float(ratio)
    layer_map, top = _plan(parent.cfg, child_cfg, ratio, method)
    child = build_model(child_cfg, rngs=rngs)
    C = params_of(child)
    noise = None
    if noise_std > 0:
        noise = lambda shape: noise_std * jax.random.normal(rngs.params(), shape)  # noqa: E731
    targets = _pair_targets(params_of(parent), C, parent.cfg, child_cfg, layer_map, top,
                            split=split, noise=noise)
    flat = _flat(C)
    for path, (target, _) in targets.items():
        fresh = flat[path]
        target = jnp.asarray(target, fresh.dtype)
        if method == "layers":
            flat[path] = target
        else:  # shrink and perturb; the endpoints are exact (1 * p + 0 * f == p)
            flat[path] = ratio * target + (1.0 - ratio) * fresh
    state = nnx.state(child, nnx.Param)
    nnx.replace_by_pure_dict(state, from_per_layer(child_cfg, _unflat(flat)))
    nnx.update(child, state)
    return child


def upcycle(dense_model, moe_cfg_model: ModelConfig, *, rngs: nnx.Rngs, noise_std: float = 0.0,
            split: bool = False):
    """Sparse upcycling (Komatsuzaki et al. 2022): an MoE model from a dense one.

    ``inherit(dense, moe_cfg, ratio=1)`` with the checks of an upcycle: ``moe_cfg_model``
    matches the dense config except for ``moe``; every dense parameter finds its place;
    each expert is the layer's dense MLP (``+ noise_std * std(w) * N(0, 1)``, independent
    per expert; with ``split`` a slice of it), router / shared experts / balancing state
    fresh. With ``topk_softmax`` or ``norm_topk_prob`` (weights summing to 1), no noise,
    no split and no dropped tokens, the MoE model computes the dense model's function.
    """
    dense_cfg = dense_model.cfg
    if dataclasses.replace(moe_cfg_model, moe=dense_cfg.moe) != dense_cfg:
        raise ValueError("upcycle: the MoE config must equal the dense one except for `moe`")
    used = {m.parent for m in correspondence(dense_model, moe_cfg_model, split=split)}
    missing = sorted(n for n in map(_name, _flat(params_of(dense_model))) if n not in used)
    if missing:
        raise ValueError(f"upcycle: dense parameters with no place in the MoE model: {missing}")
    return inherit(dense_model, moe_cfg_model, ratio=1.0, rngs=rngs, noise_std=noise_std,
                   split=split)
