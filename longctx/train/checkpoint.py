"""Checkpoints with orbax ``CheckpointManager``: async, keep-last-N, resume, re-shard.

A checkpoint step holds two items:

* ``state``: the train state (model parameters and optimizer state) as a pure
  dict of arrays, saved from its sharded form by every process;
* ``data``: JSON with the input iterator's state and the step, so that a resumed
  run sees exactly the batches an uninterrupted one would.

Restoring takes an *abstract* target (``jax.ShapeDtypeStruct`` with the
``NamedSharding`` of the current mesh), so a checkpoint written on one mesh
shape restores onto another. Orbax writes a step into a temporary directory and
renames it when complete, so an interrupted save never looks like a step. A
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

log = logging.getLogger(__name__)


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

    def restore_latest(self, abstract_state, *, partial: bool = False):
        """``(step, state, data)`` of the newest readable checkpoint, or None if none is.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` (with shardings) in the
        layout the state should be restored to. ``partial``: ``abstract_state`` is a
        subtree of what was saved (e.g. the model without its optimizer); only it is read.
        """
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
