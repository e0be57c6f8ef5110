"""Parameter layout: the model's own tree <-> the per-layer view that interop code uses.

Checkpoint conversion (``longctx.hf``), inheritance (``longctx.inherit``) and anything
else that addresses parameters layer by layer work on the **per-layer view**: the pure
dict of ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` with layer ``i`` under
``["blocks"][i]`` (``blocks/{i}/mixer/...``, ``blocks/{i}/mlp/...``), the rest
(``embed``, ``final_norm``, ``lm_head``, ``wrapper``) at the top.

These two functions are the only boundary between that view and the model's layout. While
the layers are unrolled (a Python list of blocks) both are the identity; when layers are
stacked for ``lax.scan`` (``model.scan_layers``) they slice / stack the layer axis.
"""

from __future__ import annotations

from longctx.config import ModelConfig


def to_per_layer(cfg: ModelConfig, params: dict) -> dict:
    """The model's pure-dict parameters -> the per-layer view (``["blocks"][i]``)."""
    del cfg  # unrolled layers: the model's own tree is the per-layer view
    return params


def from_per_layer(cfg: ModelConfig, params: dict) -> dict:
    """The per-layer view -> the model's pure-dict parameters (inverse of `to_per_layer`)."""
    del cfg
    return params
