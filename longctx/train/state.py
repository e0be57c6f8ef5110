"""The train state: (model, optimizer) created directly in its shards, and its restore.

    ts = TrainState.create(cfg, mesh, rules)                      # model + optimizer
    ts = TrainState.create(cfg, mesh, rules, with_optimizer=False)  # model only (evals)
    ts = TrainState.create(cfg, mesh, rules, allocate=False)      # shapes + shardings only
    step = ts.restore(checkpointer)                               # None: nothing to restore

Checkpoints hold the pure dict of ``nnx.state((model, optimizer))``; a model-only
state restores just the model's part of it (orbax partial restore), so evaluating
a checkpoint never allocates optimizer moments.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from longctx.config import Config
from longctx.model import build_model
from longctx.parallel import sharding as shd
from longctx.train import metrics as M
from longctx.train.checkpoint import Checkpointer, convert_layout
from longctx.train.optimizer import make_optimizer


class TrainState:
    """``graphdef`` / ``state`` of ``(model, optimizer)`` (or ``(model,)``) on a mesh."""

    def __init__(self, graphdef, state, sharding, abstract, with_optimizer: bool):
        self.graphdef, self.state, self.sharding = graphdef, state, sharding
        self.abstract_state = nnx.state(abstract)
        self.abstract_model = abstract[0]  # static attributes only: FLOPs, segments
        self.with_optimizer = with_optimizer
        self.n_params, self.n_active = M.active_params(
            self.abstract_model.cfg, nnx.state(self.abstract_model, nnx.Param))

    @classmethod
    def create(cls, cfg: Config, mesh, rules, *, with_optimizer: bool = True,
               allocate: bool = True) -> "TrainState":
        """Initialise from ``cfg.train.seed``, each array created in its own shards.

        ``allocate=False``: allocate nothing; ``state`` holds ``jax.ShapeDtypeStruct``s with the
        trainer's shardings (ahead-of-time compiles for devices this machine may not have).
        """
        tx = make_optimizer(cfg.optim, cfg.train.steps) if with_optimizer else None

        def build():
            model = build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
            return (model, nnx.Optimizer(model, tx, wrt=nnx.Param)) if tx else (model,)

        abstract = nnx.eval_shape(build)
        graphdef, abstract_state = nnx.split(abstract)
        sharding = shd.state_shardings(abstract_state, mesh, rules)
        if not allocate:
            state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 abstract_state, sharding)
            return cls(graphdef, state, sharding, abstract, with_optimizer)
        with jax.set_mesh(mesh), shd.activation_rules(mesh, rules):
            state = jax.jit(lambda: nnx.state(build()), out_shardings=sharding)()
        return cls(graphdef, state, sharding, abstract, with_optimizer)

    def restore_target(self):
        """Abstract arrays (shape, dtype, sharding of *this* mesh) for orbax restore."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nnx.to_pure_dict(self.abstract_state), nnx.to_pure_dict(self.sharding))

    def restore(self, ckpt: Checkpointer):
        """Load the newest readable checkpoint into ``state``; ``(step, data)`` or None.

        A checkpoint written with the other ``model.scan_layers`` restores too (its
        layers unrolled <-> stacked by :func:`longctx.train.checkpoint.convert_layout`).
        """
        target, cfg = self.restore_target(), self.abstract_model.cfg
        other = dataclasses.replace(cfg, scan_layers=not cfg.scan_layers)
        shardings = jax.tree.map(lambda t: t.sharding, target)

        def convert(pure):  # the other layout -> ours, placed in our shards
            return jax.device_put(convert_layout(pure, other, cfg), shardings)

        restored = ckpt.restore_latest(target, partial=not self.with_optimizer,
                                       alternatives=[(convert_layout(target, cfg, other), convert)])
        if restored is None:
            return None
        step, pure, data = restored
        nnx.replace_by_pure_dict(self.state, pure)
        return step, data

    def model(self):
        return nnx.merge(self.graphdef, self.state)[0]
