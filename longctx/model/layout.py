"""Parameter layout: the model's own tree <-> the per-layer view that interop code uses.

Checkpoint conversion (``longctx.hf``), inheritance (``longctx.inherit``) and anything
else that addresses parameters layer by layer work on the **per-layer view**: the pure
dict of ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` with layer ``i`` under
``["blocks"][i]`` (``blocks/{i}/mixer/...``, ``blocks/{i}/mlp/...``), the rest
(``embed``, ``final_norm``, ``lm_head``, ``wrapper``) at the top.

:func:`to_per_layer` / :func:`from_per_layer` are the only boundary between that view and
the model's layout:

* ``model.scan_layers: false``: the layers are an unrolled list ``blocks/{i}``, the
  model's tree *is* the per-layer view (both functions are the identity);
* ``model.scan_layers: true``: the layers are cut into **stages** (:func:`stages`). A
  scanned stage is ``n`` repetitions of a group of ``g`` consecutive layers of identical
  kind (one repetition of ``model.attention.pattern``, MoE placement included), stored
  once with every array stacked ``[n, ...]`` (logical axis ``layers``) and run by
  ``lax.scan``; layers that do not repeat (``moe.first_dense_layers``, a remainder) are
  unrolled stages of one layer. The tree is ``stages/{s}/blocks/{k}/...``: position
  ``k`` of the group of stage ``s``, whose slice ``j`` is layer ``start + j * g + k``.

The same functions convert anything shaped like the parameters (optimizer moments,
``jax.ShapeDtypeStruct`` restore targets, trees of ``NamedSharding``: a stacked sharding
gains / loses its leading ``layers`` entry); ``longctx.train.checkpoint.convert_layout`` applies them to a whole
train state so that a checkpoint written unscanned restores scanned and back. The
carried per-layer decoding / segment state has the same two layouts
(:func:`states_to_per_layer`, :func:`states_from_per_layer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from longctx.config import ModelConfig


@dataclass(frozen=True)
class Stage:
    """Layers ``start + j * size + k`` (``j < repeats``, ``k < size``) of the model."""

    start: int  # first layer of the stage
    size: int  # layers per group (g)
    repeats: int  # groups (n)
    scanned: bool  # stacked [n, ...] and run by lax.scan; False: one unrolled layer

    def layer(self, j: int, k: int) -> int:
        return self.start + j * self.size + k

    @property
    def stop(self) -> int:
        return self.start + self.size * self.repeats


def layer_kinds(cfg: ModelConfig) -> list[tuple[str, bool]]:
    """``(backend, is_moe)`` of every layer: layers of one kind have one parameter shape."""
    moe = set(cfg.moe.layers(cfg.n_layers))
    return [(b, i in moe) for i, b in enumerate(cfg.layer_backends)]


def group_size(cfg: ModelConfig) -> int:
    """Layers per scanned group: the period of the backend pattern and the MoE placement."""
    period = len(cfg.attention.pattern) or 1
    if cfg.moe.num_experts:
        period = math.lcm(period, cfg.moe.every)
    return period


def stages(cfg: ModelConfig) -> list[Stage]:
    """The stages of a ``scan_layers`` model, in layer order (greedy, left to right).

    From layer ``i``: if the group ``kinds[i:i+g]`` repeats ``n >= 2`` times back to back,
    one scanned stage of ``n`` groups; otherwise layer ``i`` alone, unrolled. E.g.
    ``moe.first_dense_layers=1``, every layer MoE after it, 8 layers: layer 0 unrolled,
    then a scan over 7 one-layer groups; pattern ``[linear, full]`` with
    ``first_dense_layers=1``: layer 0 unrolled, a scan over 3 groups ``(full, linear)``
    (layers 1-6), layer 7 unrolled.
    """
    kinds, g, L = layer_kinds(cfg), group_size(cfg), cfg.n_layers
    out, i = [], 0
    while i < L:
        n = 0
        while i + (n + 1) * g <= L and kinds[i + n * g:i + (n + 1) * g] == kinds[i:i + g]:
            n += 1
        if n >= 2:
            out.append(Stage(i, g, n, True))
            i += n * g
        else:
            out.append(Stage(i, 1, 1, False))
            i += 1
    return out


# -- leaves: arrays (numpy or jax) and restore targets --------------------------------


def _take(a, j: int):
    if isinstance(a, NamedSharding):  # a tree of shardings: the slice's loses `layers`
        return NamedSharding(a.mesh, P(*tuple(a.spec)[1:]))
    if isinstance(a, jax.ShapeDtypeStruct):
        sh = a.sharding
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:]))
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sh)
    return a[j]


def _stack(xs: list):
    a = xs[0]
    if isinstance(a, NamedSharding):
        return NamedSharding(a.mesh, P(None, *tuple(a.spec)))
    if isinstance(a, jax.ShapeDtypeStruct):
        sh = a.sharding
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, P(None, *tuple(sh.spec)))
        return jax.ShapeDtypeStruct((len(xs), *a.shape), a.dtype, sharding=sh)
    if isinstance(a, np.ndarray):
        return np.stack(xs)
    return jnp.stack(xs)


# -- parameters -----------------------------------------------------------------------


def to_per_layer(cfg: ModelConfig, params: dict) -> dict:
    """The model's pure-dict parameters -> the per-layer view (``["blocks"][i]``).

    ``params`` may be partial (a subset of leaves, e.g. optimizer moments of Params only).
    """
    if not cfg.scan_layers:
        return params  # unrolled layers: the model's own tree is the per-layer view
    out = {k: v for k, v in params.items() if k != "stages"}
    blocks = {}
    for s, st in enumerate(stages(cfg)):
        group = params.get("stages", {}).get(s, {}).get("blocks", {})
        for k, tree in group.items():
            for j in range(st.repeats):
                blocks[st.layer(j, k)] = (jax.tree.map(lambda a: _take(a, j), tree)
                                          if st.scanned else tree)
    out["blocks"] = dict(sorted(blocks.items()))
    return out


def from_per_layer(cfg: ModelConfig, params: dict) -> dict:
    """The per-layer view -> the model's pure-dict parameters (inverse of `to_per_layer`)."""
    if not cfg.scan_layers:
        return params
    out = {k: v for k, v in params.items() if k != "blocks"}
    blocks = params.get("blocks", {})
    out["stages"] = {}
    for s, st in enumerate(stages(cfg)):
        group = {}
        for k in range(st.size):
            layers = [blocks[st.layer(j, k)] for j in range(st.repeats)
                      if st.layer(j, k) in blocks]
            if not layers:
                continue
            if len(layers) != st.repeats:
                raise ValueError(f"from_per_layer: stage {s} needs layers "
                                 f"{[st.layer(j, k) for j in range(st.repeats)]}; "
                                 f"got {sorted(blocks)}")
            group[k] = (jax.tree.map(lambda *xs: _stack(list(xs)), *layers)
                        if st.scanned else layers[0])
        out["stages"][s] = {"blocks": group}
    return out


def params_of(model) -> dict:
    """``model``'s parameters in the per-layer view (pure dict of arrays), either layout."""
    return to_per_layer(model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def blocks_of(model) -> list:
    """Layer ``i``'s block module, for every ``i``, either layout (for inspection: types,
    attributes, metadata). A scanned stage's layers share one stacked module, whose
    variables carry the leading ``[n]`` axis; read values through :func:`params_of`."""
    if not model.cfg.scan_layers:
        return list(model.blocks)
    out = [None] * model.cfg.n_layers
    for st, group in zip(stages(model.cfg), model.stages):
        for j in range(st.repeats):
            for k in range(st.size):
                out[st.layer(j, k)] = group.blocks[k]
    return out


def set_params(model, params: dict) -> None:
    """Write the per-layer view ``params`` (all of ``model``'s parameters) into ``model``."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, from_per_layer(model.cfg, params))
    nnx.update(model, state)


# -- carried state (decoding, segments) --------------------------------------------------


def states_to_per_layer(cfg: ModelConfig, layer_states: list) -> list:
    """``state["layers"]`` of ``model.init_state`` / ``step`` -> one state per layer.

    Scanned: ``layer_states[s][k]`` is position ``k`` of stage ``s``'s group, stacked
    ``[n, ...]``; unrolled: the list of per-layer states itself.
    """
    if not cfg.scan_layers:
        return layer_states
    out = [None] * cfg.n_layers
    for st, group in zip(stages(cfg), layer_states):
        for k, s in enumerate(group):
            for j in range(st.repeats):
                out[st.layer(j, k)] = jax.tree.map(lambda a: a[j], s) if st.scanned else s
    return out


def states_from_per_layer(cfg: ModelConfig, per_layer: list) -> list:
    """Inverse of :func:`states_to_per_layer`."""
    if not cfg.scan_layers:
        return per_layer
    return [[jax.tree.map(lambda *xs: jnp.stack(xs), *[per_layer[st.layer(j, k)]
                                                       for j in range(st.repeats)])
             if st.scanned else per_layer[st.layer(0, k)] for k in range(st.size)]
            for st in stages(cfg)]
