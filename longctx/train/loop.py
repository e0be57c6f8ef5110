"""The sharded trainer: ``python -m longctx.train --config PATH [key=value ...]``.

One ``jax.jit`` with ``NamedSharding``s for the train state and the batch over
the device mesh (pjit semantics), from one CPU to a TPU pod. ``train()`` reads
top to bottom in banner sections: processes and run directory, mesh, input
pipeline, model and optimizer (created sharded), checkpoint restore, the
update step, the loop (metrics, evaluation, checkpoints, preemption). The
pieces it calls live beside it: ``optimizer.py`` (AdamW and its schedule),
``step.py`` (loss, the windowed loss of segment-scanned models, the jitted
steps), ``state.py`` (the sharded train state and its restore),
``checkpoint.py``, ``metrics.py``.

Run directory (``train.run_dir``): ``config.yaml`` (resolved config),
``metrics.jsonl``, ``tb/`` (TensorBoard), ``checkpoints/`` (orbax). Only process
0 writes logs and metrics; every process takes part in checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from longctx.config import Config, config_yaml, task_kwargs
from longctx.data.pipeline import build_source, make_dataset, restore_iterator
from longctx.parallel import distributed
from longctx.parallel import sharding as shd
from longctx.train import metrics as M
from longctx.train import compiled, distill
from longctx.train.checkpoint import Checkpointer
from longctx.train.optimizer import lr_schedule
from longctx.train.state import TrainState
from longctx.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------


def make_source(cfg: Config, *, eval_split: bool = False):
    """The random-access source of ``cfg.data`` (None: no evaluation data)."""
    d, V = cfg.data, cfg.model.vocab_size
    if d.source == "synthetic":
        return build_source("synthetic", seq_len=d.seq_len, vocab_size=V, task=d.task,
                            seed=d.eval_seed if eval_split else d.seed, **task_kwargs(cfg))
    path = d.eval_path if eval_split else d.path
    if path is None:
        return None
    paths = path.split(",")
    kw = {"text": dict(paths=paths),
          "jsonl": dict(path=paths[0], text_field=d.text_field),
          "tokens": dict(path=paths[0], dtype=d.token_dtype, eos_id=d.eos_id)}[d.source]
    return build_source(d.source, seq_len=d.seq_len, vocab_size=V, **kw)


def make_input(cfg: Config, *, eval_split: bool = False):
    source = make_source(cfg, eval_split=eval_split)
    if source is None:
        return None
    return make_dataset(source, global_batch_size=cfg.train.batch_size,
                        process_index=jax.process_index(), process_count=jax.process_count(),
                        seed=cfg.data.seed, shuffle=cfg.data.shuffle and not eval_split)


BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids")  # what a step receives


def batch_spec(cfg: Config, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a step receives, as abstract arrays in the trainer's sharding:
    ``tokens`` / ``targets`` int32, ``loss_mask`` float32, and ``segment_ids`` int32 for
    file sources (documents packed into rows, ``longctx.data.pipeline``)."""
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    dtypes = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32}
    if cfg.data.source != "synthetic":
        dtypes["segment_ids"] = jnp.int32
    sharding = shd.batch_sharding(mesh, rules)
    return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in dtypes.items()}


def jit_train_step(cfg: Config, ts: TrainState, mesh, rules, distiller=None,
                   parent_shardings=()):
    """The trainer's update step: one ``jax.jit`` over the mesh with the state's and the
    batch's ``NamedSharding``s, the old state donated. ``python -m longctx.compile`` lowers
    this very function for a target."""
    t = cfg.train
    return jax.jit(make_train_step(ts.graphdef, t.grad_accum_steps,
                                   loss_chunk_size=t.loss_chunk_size, distill=distiller),
                   in_shardings=(ts.sharding, shd.batch_sharding(mesh, rules), *parent_shardings),
                   out_shardings=(ts.sharding, None),
                   donate_argnums=0)  # the old state's buffers hold the new one


# ----------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------


class _Preemption:
    """SIGTERM (preemption notice) sets a flag; the loop saves and stops at a step boundary."""

    def __init__(self):
        self.requested = False
        self._prev = None

    def __enter__(self):
        try:
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._prev = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping at the end of this step")
        self.requested = True

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def train(cfg: Config, *, progress: bool = True, stop_at_step: int | None = None,
          return_state: bool = False):
    """Train ``cfg``; returns the last logged metrics (and ``status``).

    ``stop_at_step``: stop (with a checkpoint) after that step, as a preemption
    would; used by the resume tests. ``return_state``: also return the final
    train state as a pure dict of (sharded) arrays.
    """
    # -- processes and run directory ----------------------------------------------
    distributed.maybe_initialize()
    t, lead = cfg.train, jax.process_index() == 0
    run_dir = epath.Path(t.run_dir)  # local or remote (gs://...): written through epath
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml(cfg))

    # -- mesh -----------------------------------------------------------------------
    mesh = shd.make_mesh(cfg.mesh.ici, cfg.mesh.dcn)
    rules = {**shd.DEFAULT_RULES, **cfg.mesh.rules}  # the config overrides defaults per name
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
             jax.process_count())

    # -- input pipeline ---------------------------------------------------------------
    train_ds = make_input(cfg)
    eval_ds = make_input(cfg, eval_split=True)

    # -- model and optimizer, created directly in their shards -----------------------
    ts = TrainState.create(cfg, mesh, rules)
    graphdef, state_sharding = ts.graphdef, ts.sharding
    log.info("model: %.2fM parameters (%.2fM active non-embedding)", ts.n_params / 1e6,
             ts.n_active / 1e6)

    # -- checkpoint restore -----------------------------------------------------------------
    ckpt = Checkpointer(str(run_dir / "checkpoints"), keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    start_step, train_it = 0, iter(train_ds)
    restored = ts.restore(ckpt) if cfg.checkpoint.resume else None
    if restored is not None:
        start_step, data = restored
        train_it = restore_iterator(train_ds, data["input"])
        log.info("resumed from step %d of %s", start_step, ckpt.directory)
    state = ts.state

    def save(step, wait=False):
        ckpt.save(step, nnx.to_pure_dict(state), {"input": train_it.get_state(), "step": step},
                  wait=wait)

    # -- distillation: a frozen parent, sharded like the child (distill section) -----
    distiller, parent_args, parent_shardings = None, (), ()
    if cfg.distill.enabled:
        distiller, parent_state, parent_sharding = distill.load_parent(cfg, mesh, rules)
        parent_args, parent_shardings = (parent_state,), (parent_sharding,)
        log.info("distilling from %s (alpha %.3g over %d steps)", cfg.distill.parent,
                 cfg.distill.alpha, cfg.distill.steps)

    # -- the update step: one jit over the mesh, state donated ---------------------------
    train_step = jit_train_step(cfg, ts, mesh, rules, distiller, parent_shardings)
    if t.compiled_step:  # compiled ahead of time (python -m longctx.compile --save)
        train_step = compiled.load(t.compiled_step, cfg, mesh, train_step,
                                   (ts.state, batch_spec(cfg, mesh, rules), *parent_args))
    batch_sharding = shd.batch_sharding(mesh, rules)
    eval_step = jax.jit(make_eval_step(graphdef, loss_chunk_size=t.loss_chunk_size),
                        in_shardings=(state_sharding, batch_sharding))

    def device_batch(b):
        return shd.to_global({k: v for k, v in b.items() if k in BATCH_KEYS}, mesh, rules)

    def evaluate():
        if eval_ds is None:
            return {}
        it, rows = iter(eval_ds), []
        for _ in range(t.eval_batches):
            rows.append(eval_step(state, device_batch(next(it))))
        return {f"eval_{k}": float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}

    # -- loop -----------------------------------------------------------------------------
    schedule = lr_schedule(cfg.optim, t.steps)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    flops_per_step = M.train_flops_per_step(ts.abstract_model, ts.n_active,
                                            batch=t.batch_size, seq_len=cfg.data.seq_len)
    peak, peak_src = M.peak_flops()
    log.info("MFU reference: %.1f TFLOP/s per device (%s)", peak / 1e12, peak_src)
    writer = None
    if lead and t.tensorboard:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))  # tensorboardX writes gs:// itself
    mf = (run_dir / "metrics.jsonl").open("a") if lead else None

    def emit(row, step):
        if not lead:
            return
        mf.write(json.dumps(row) + "\n")
        mf.flush()
        if writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, step)

    final, status = {}, "done"
    last_good = ckpt.steps()[-1] if ckpt.steps() else None
    memory_logged = False
    with jax.set_mesh(mesh), shd.activation_rules(mesh, rules), _Preemption() as pre, \
            tqdm(range(start_step, t.steps), initial=start_step, total=t.steps,
                 disable=not (progress and lead), desc="train", dynamic_ncols=True) as bar:
        t_last, since = time.perf_counter(), 0
        for step in bar:
            batch = device_batch(next(train_it))
            if not memory_logged:
                mem = M.device_peak_memory()
                if mem is None:  # CPU: the compiled program's own accounting
                    ma = compiled.memory_analysis_of(train_step, state, batch, *parent_args)
                    mem = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                log.info("train step memory: %.1f MiB", mem / 2**20)
                memory_logged = True
            state, metrics = train_step(state, batch, *parent_args)
            since += 1
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                row = {k: float(v) for k, v in metrics.items()}
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(
                        f"loss is {row['loss']} at step {done}; last good checkpoint: "
                        f"{'none' if last_good is None else f'step {last_good}'} in {ckpt.directory}")
                dt = (time.perf_counter() - t_last) / since
                row.update(step=done, lr=float(schedule(step)), step_time_s=dt,
                           tokens_per_s=tokens_per_step / dt,
                           tflops_per_s=flops_per_step / dt / 1e12,
                           mfu=flops_per_step / dt / (peak * jax.device_count()))
                if mem is not None:
                    row["memory_bytes"] = float(mem)
                t_last, since = time.perf_counter(), 0
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
                emit(row, done)
                final.update(row)
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                ev = evaluate()
                if ev:
                    emit({**ev, "step": done}, done)
                    if lead:
                        bar.write(f"step {done}: eval loss {ev['eval_loss']:.4f} "
                                  f"accuracy {ev['eval_accuracy']:.4f}")
                    final.update(ev)
            every = cfg.checkpoint.every_steps
            stop = pre.requested or done == stop_at_step
            if done == t.steps or stop or (every and done % every == 0):
                save(done, wait=stop or done == t.steps)
                last_good = done
            if stop:
                status = "preempted" if pre.requested else "stopped"
                log.warning("stopped after step %d (checkpoint saved)", done)
                break
    ckpt.close()
    if mf is not None:
        mf.close()
    if writer is not None:
        writer.close()
    final["status"] = status
    return (final, nnx.to_pure_dict(state)) if return_state else final
