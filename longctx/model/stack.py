"""Stacked layers (``model.scan_layers``): groups built by ``nnx.vmap``, run by ``lax.scan``.

The stages of :func:`longctx.model.layout.stages` (their layout and the per-layer view are
described there). A scanned stage is one :class:`Group` of ``g`` blocks whose every
variable carries a leading ``[n]`` axis (logical axis ``layers``, unsharded by the default
rules): built once under ``nnx.split_rngs`` + ``nnx.vmap`` (one compiled init for any
``n``), run as one ``jax.lax.scan`` over the ``n`` groups whose body runs the group's
blocks in order, each block with the model's per-block remat policy. The compiled program
holds one copy of a group per stage, however deep the model. An unrolled stage is a
Group of one plain block.

The carried state of a stage (decoding, segments) is the list of its group's ``g`` mixer
states, each stacked ``[n, ...]`` for a scanned stage; aux scalars come out ``[n]``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from longctx.model.layout import Stage


class Group(nnx.Module):
    """``g`` consecutive blocks (one repetition of the layer pattern)."""

    def __init__(self, blocks):
        self.blocks = nnx.List(blocks)


def build_stages(stages: list[Stage], make_block: Callable, rngs: nnx.Rngs) -> nnx.List:
    """One :class:`Group` per stage; ``make_block(layer, rngs)`` builds layer ``layer``.

    A scanned stage's group is built ``repeats`` times in one ``nnx.vmap`` with the
    random streams split per group, so every group draws its own weights.
    """
    def builder(st):
        return lambda rngs: Group([make_block(st.layer(0, k), rngs) for k in range(st.size)])

    out = []
    for st in stages:
        group = builder(st)
        if st.scanned:
            group = nnx.split_rngs(splits=st.repeats)(nnx.vmap(
                group, in_axes=(0,), out_axes=0, axis_size=st.repeats,
                transform_metadata={nnx.PARTITION_NAME: "layers"}))
        out.append(group(rngs))
    return nnx.List(out)


def init_states(groups, stages: list[Stage], batch_size: int, dtype) -> list:
    """Every stage's carried state: ``[[mixer state of position k] for k < g]``."""
    def of(group):
        return [b.mixer.init_state(batch_size, dtype) for b in group.blocks]

    out = []
    for group, st in zip(groups, stages):
        if st.scanned:  # vmapped: a state computed from parameters is per group too
            graphdef, state = nnx.split(group)
            out.append(jax.vmap(lambda s: of(nnx.merge(graphdef, s)))(state))
        else:
            out.append(of(group))
    return out


def mixing_flops(groups, stages: list[Stage], batch: int, seq_len: int,
                 segment_len: int) -> float:
    """Sum over layers of each mixer's ``mixing_flops`` (static sizes: any group stands for all)."""
    return sum(st.repeats * b.mixer.mixing_flops(batch, seq_len, segment_len)
               for group, st in zip(groups, stages) for b in group.blocks)


def run_stages(groups, stages: list[Stage], x, layer_states, run_block: Callable):
    """Every stage over ``x [B, S, E]`` -> ``(x, aux dicts, new states)``.

    ``run_block(block, x, state, in_scan) -> (x, state, aux)`` runs one block (remat,
    sharding constraints: the model's). ``layer_states``: None (stateless forward) or as
    :func:`init_states`. Aux values of a scanned stage come out stacked ``[n]``.
    """
    auxes, new_states = [], []
    for s, (group, st) in enumerate(zip(groups, stages)):
        states = [None] * st.size if layer_states is None else layer_states[s]
        if not st.scanned:
            new, group_aux = [], []
            for block, state in zip(group.blocks, states):
                x, state, aux = run_block(block, x, state, False)
                new.append(state)
                group_aux.append(aux)
        else:
            x, new, group_aux = _scan_group(group, x, states, run_block)
        auxes.extend(group_aux)
        new_states.append(new)
    return x, auxes, new_states


def _scan_group(group, x, states, run_block):
    graphdef, params, rest = nnx.split(group, nnx.Param, ...)
    rng_filter = nnx.RngState

    def body(x, xs):
        params, rest, states = xs
        g = nnx.merge(graphdef, params, rest)
        new, auxes = [], []
        for block, state in zip(g.blocks, states):
            x, state, aux = run_block(block, x, state, True)
            new.append(state)
            auxes.append(aux)
        # Random streams advanced inside the body (MoE jitter) come back out per group.
        return x, (new, auxes, nnx.state(g, rng_filter))

    x, (new, auxes, rngs) = jax.lax.scan(body, x, (params, rest, states))
    if jax.tree.leaves(rngs):
        nnx.update(group, rngs)
    return x, new, auxes
