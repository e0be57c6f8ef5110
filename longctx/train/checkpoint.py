"""Checkpoints with orbax ``CheckpointManager``: async, keep-last-N, resume, re-shard.

A checkpoint step holds two items:

* ``state``: the train state (model parameters and optimizer state) as a pure
  dict of arrays, saved from its sharded form by every process;
* ``data``: JSON with the input iterator's state and the step, so that a resumed
  run sees exactly the batches an uninterrupted one would.

Restoring takes an *abstract* target (``jax.ShapeDtypeStruct`` with the
``NamedSharding`` of the current mesh), so a checkpoint written on one mesh
shape restores onto another. Orbax writes a step into a temporary directory and
renames it when complete, so an interrupted save never looks like a step. A step
written in another parameter layout (``model.scan_layers`` flipped: layers unrolled
``blocks/{i}`` vs stacked ``stages/{s}``) restores through :func:`convert_layout`, which
re-lays out the parameters and every optimizer moment by ``longctx.model.layout``. A
step that is present but unreadable (truncated or corrupted files) is skipped
with a warning and the previous one is used; the bad step is moved aside to
``<directory>.unreadable/<step>`` (kept for inspection, out of the way of the
run that will write that step again).
"""

from __future__ import annotations

import logging
import os
import time

import jax
import orbax.checkpoint as ocp
from etils import epath

from longctx.config import ModelConfig
from longctx.model import layout

log = logging.getLogger(__name__)


def convert_layout(tree, src: ModelConfig, dst: ModelConfig):
    """A pure-dict train state (or model, or restore target) from ``src``'s parameter layout
    to ``dst``'s (``model.scan_layers`` either way; the configs otherwise equal).

    Every sub-dict shaped like the model's parameters (the model itself, each optimizer
    moment) goes through the per-layer view: ``from_per_layer(dst, to_per_layer(src, .))``.
    """
    if src.scan_layers == dst.scan_layers:
        return tree
    key = "stages" if src.scan_layers else "blocks"

    def walk(t):
        if isinstance(t, dict):
            if key in t:
                return layout.from_per_layer(dst, layout.to_per_layer(src, t))
            return {k: walk(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(walk(v) for v in t)
        return t

    return walk(tree)


def _leaf_paths(tree) -> set[str]:
    def name(k):
        return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    return {"/".join(name(k) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        # Remote paths (gs://...) stay as they are; orbax writes them through epath.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def save(self, step: int, state, data: dict, *, wait: bool = False) -> None:
        """Save (in the background unless ``wait``); ``state`` is a pytree of arrays."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)
        if wait:
            self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state, *, partial: bool = False, alternatives=()):
        """``(step, state, data)`` of the newest readable checkpoint, or None if none is.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` (with shardings) in the
        layout the state should be restored to. ``partial``: ``abstract_state`` is a
        subtree of what was saved (e.g. the model without its optimizer); only it is read.
        ``alternatives``: ``(target, convert)`` pairs for the same state in other layouts;
        a step whose saved leaves cover ``target`` (and not ``abstract_state``) is read
        as ``target`` and returned as ``convert(state)``.
        """
        for step in reversed(self.steps()):
            try:
                saved = _leaf_paths(ocp.PyTreeCheckpointer().metadata(
                    epath.Path(self.directory) / str(step) / "state").item_metadata.tree)
            except Exception:  # noqa: BLE001 -- unreadable metadata: the restore below decides
                break
            if _leaf_paths(abstract_state) <= saved:
                break
            for target, convert in alternatives:
                if _leaf_paths(target) <= saved:
                    log.info("checkpoint step %d of %s is in another parameter layout; "
                             "restoring through its conversion", step, self.directory)
                    out = self._restore_latest(target, partial=partial)
                    return out and (out[0], convert(out[1]), out[2])
            break
        return self._restore_latest(abstract_state, partial=partial)

    def _restore_latest(self, abstract_state, *, partial: bool):
        if partial:
            restore = ocp.args.PyTreeRestore(
                item=abstract_state, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        else:
            restore = ocp.args.StandardRestore(abstract_state)
        bad, found = [], None
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=restore, data=ocp.args.JsonRestore()))
                jax.block_until_ready(out["state"])
                found = step, out["state"], out["data"]
                break
            except Exception as e:  # noqa: BLE001 -- any unreadable step is skipped, loudly
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the "
                            "previous one", step, self.directory, type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "")
                bad.append(step)
        if bad:
            self._move_aside(bad)
        return found

    def _move_aside(self, steps):
        if jax.process_index() == 0:
            aside = epath.Path(self.directory + ".unreadable")
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                dest = aside / f"{step}-{int(time.time())}"
                (epath.Path(self.directory) / str(step)).rename(dest)
                log.warning("moved unreadable checkpoint step %d to %s", step, dest)
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("longctx_checkpoint_move_aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
