"""The sharded trainer: ``python -m longctx.train --config PATH [key=value ...]``.

One ``jax.jit`` with ``NamedSharding``s for the train state and the batch over
the device mesh (pjit semantics), from one CPU to a TPU pod. ``train()`` reads
top to bottom in banner sections: processes and run directory, mesh, input
pipeline, model and optimizer (created sharded), checkpoint restore, the
update step, the loop (metrics, evaluation, checkpoints, preemption).

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
import optax
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from longctx.config import Config, OptimConfig, config_yaml, task_kwargs
from longctx.data.pipeline import build_source, make_dataset, restore_iterator
from longctx.model import build_model
from longctx.model.transformer import memory_tokens
from longctx.parallel import distributed
from longctx.parallel import sharding as shd
from longctx.train import metrics as M
from longctx.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------


def lr_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine / linear decay to ``lr * min_lr_ratio`` or constant."""
    decay_steps = max(total_steps - o.warmup_steps, 1)
    end = o.lr * o.min_lr_ratio
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(o.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(o.lr)
    if o.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    return optax.join_schedules([warmup, decay], [o.warmup_steps])


def decay_mask(params):
    """Weight decay on matrices only: norms' scales and biases (ndim < 2) are skipped."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------
# Loss and steps
# ----------------------------------------------------------------------------


def _metrics_of(logits, batch, mask):
    """Summed masked cross entropy and number of correct argmax predictions."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = (jnp.argmax(logits, -1) == batch["targets"]) * mask
    return (ce * mask).sum(), correct.sum()


def loss_fn(model, batch, denom=None):
    """Masked next-token cross entropy (+ any ``*_loss`` term in aux, already weighted).

    ``denom``: the number of scored tokens to normalise by; gradient accumulation
    passes the whole batch's count so that the summed microbatch gradients equal
    the full batch's gradient exactly.
    """
    logits, aux = model(batch["tokens"], segment_ids=batch.get("segment_ids"))
    mask = batch["loss_mask"].astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0) if denom is None else denom
    ce, correct = _metrics_of(logits, batch, mask)
    loss = ce / denom + sum(v for k, v in aux.items() if k.endswith("_loss"))
    return loss, {"loss": loss, "accuracy": correct / denom, **aux}


def uses_segment_path(model_cfg, seq_len: int) -> bool:
    """Whether training runs window by window over segments (:func:`segment_value_and_grad`)."""
    N = model_cfg.segment_len
    return bool(N) and (seq_len > N or memory_tokens(model_cfg) > 0)


def segment_value_and_grad(model_def, model_state, batch, denom, *, grads: bool = True):
    """Loss, metrics (and gradients) of a segment-scanned model, window by window.

    The value and gradient of :func:`loss_fn` on ``model(tokens)`` for
    ``model.segment_len = N`` and ``model.bptt_segments = k`` (the carried state is
    cut every ``k`` segments; ``k = 0``: one window of every segment, full BPTT),
    computed so that memory does not grow with the length: a ``lax.scan`` over
    windows of ``k`` segments, each window's ``value_and_grad`` taken on its own
    with its incoming state under ``stop_gradient`` (exactly where the model's
    segment scan cuts it) and the gradients summed in the carry; inside a window a
    ``lax.scan`` over segments, each one ``jax.checkpoint`` that reduces its logits
    to the summed cross entropy at once, so no ``[B, T, vocab]`` array exists. Only
    the carried state and one window's residuals are ever alive. The sequence is
    padded to whole windows with masked tokens after the end, which causality keeps
    invisible; ``*_loss`` aux terms are averaged over the real segments as in
    ``model(tokens)``.

    Returns ``((loss, metrics), grads)`` (``grads`` None with ``grads=False``).
    """
    model = nnx.merge(model_def, model_state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # differentiate Params only
    cfg = model.cfg
    N = cfg.segment_len
    B, T = batch["tokens"].shape
    n = -(-T // N)  # real segments
    k = cfg.bptt_segments or n
    W = -(-n // k)  # windows
    pad = W * k * N - T
    fill = {"tokens": 0, "targets": 0, "loss_mask": 0, "segment_ids": -1}
    # Segments are sliced out of the [B, T] arrays inside the scan (no reshaped copies:
    # nothing of size T but the batch itself, and a padded copy only when T needs it).
    data = {name: jnp.pad(v, ((0, 0), (0, pad)), constant_values=fill[name]) if pad else v
            for name, v in batch.items() if name in fill}

    @jax.checkpoint  # per segment: keep only the carried state inside a window
    def segment(ps, state, i):  # i: the segment's index in the sequence
        x = {name: jax.lax.dynamic_slice_in_dim(v, i * N, N, axis=1) for name, v in data.items()}
        m = nnx.merge(graphdef, ps, rest)
        logits, aux, state = m.step(x["tokens"], state, segment_ids=x.get("segment_ids"))
        ce, correct = _metrics_of(logits, x, x["loss_mask"].astype(jnp.float32))
        real = (i < n).astype(jnp.float32)  # padding segments: no aux
        return state, (ce, correct, jax.tree.map(lambda a: a * real / n, aux))

    def window_loss(ps, state, w):  # w: the window's index
        fresh = nnx.merge(graphdef, ps, rest).init_state(B)  # may hold parameters (memory tokens)
        state = jax.tree.map(lambda f, s: jnp.where(w == 0, f, s), fresh, state)
        state, (ce, correct, aux) = jax.lax.scan(lambda st, j: segment(ps, st, w * k + j),
                                                 state, jnp.arange(k, dtype=jnp.int32))
        aux = jax.tree.map(lambda a: jnp.sum(a, axis=0), aux)  # this window's share of the mean
        loss = ce.sum() / denom + sum(v for name, v in aux.items() if name.endswith("_loss"))
        return loss, (state, correct.sum(), aux)

    window = jax.value_and_grad(window_loss, has_aux=True) if grads else None

    def body(carry, w):
        state, loss, correct, aux, acc = carry
        state = jax.lax.stop_gradient(state)
        if grads:
            (l, (state, c, a)), g = window(params, state, w)
            acc = jax.tree.map(jnp.add, acc, g)
        else:
            l, (state, c, a) = window_loss(params, state, w)
        return (state, loss + l, correct + c, jax.tree.map(jnp.add, aux, a), acc), None

    state0 = model.init_state(B)
    aux0 = jax.eval_shape(lambda: window_loss(params, state0, jnp.int32(0))[1][2])
    aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
    acc0 = jax.tree.map(jnp.zeros_like, params) if grads else None
    zero = jnp.zeros((), jnp.float32)
    (_, loss, correct, aux, acc), _ = jax.lax.scan(
        body, (state0, zero, zero, aux0, acc0), jnp.arange(W, dtype=jnp.int32))
    return (loss, {"loss": loss, "accuracy": correct / denom, **aux}), acc


def make_train_step(graphdef, accum_steps: int):
    """``(state, batch) -> (state, metrics)``: grads (accumulated), one optimizer update."""
    from longctx.model.moe import update_router_bias

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        model_def, model_state = nnx.split(model)
        denom = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)

        segmented = uses_segment_path(model.cfg, batch["tokens"].shape[1])

        def grads_of(model_state, batch):  # pure in the model's state: safe inside lax.scan
            if segmented:  # memory independent of length (truncated BPTT window by window)
                (_, metrics), grads = segment_value_and_grad(model_def, model_state, batch, denom)
                return grads, metrics
            fn = lambda m: loss_fn(m, batch, denom)  # noqa: E731
            (_, metrics), grads = nnx.value_and_grad(fn, has_aux=True)(
                nnx.merge(model_def, model_state))
            return grads, metrics

        if accum_steps == 1:
            grads, metrics = grads_of(model_state, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

            def body(carry, mb):  # the model state rides in the carry: nnx forbids closing
                acc, ms = carry  # over Variables of an outer trace
                return (jax.tree.map(jnp.add, acc, grads_of(ms, mb)), ms), None

            shapes = jax.eval_shape(grads_of, model_state, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((grads, metrics), _), _ = jax.lax.scan(body, (zeros, model_state), micro)
            # loss / accuracy: sums of terms normalised by the whole batch's count (exact);
            # other aux statistics are averaged over microbatches.
            metrics = {k: v if k in ("loss", "accuracy") else v / accum_steps
                       for k, v in metrics.items()}
        optimizer.update(model, grads)
        update_router_bias(model, grads)  # MoE aux-loss-free balancing (no-op without MoE bias)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return nnx.state((model, optimizer)), metrics

    return step


def make_eval_step(graphdef):
    def step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        if uses_segment_path(model.cfg, batch["tokens"].shape[1]):
            model_def, model_state = nnx.split(model)
            denom = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
            return segment_value_and_grad(model_def, model_state, batch, denom, grads=False)[0][1]
        return loss_fn(model, batch)[1]

    return step


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
# Train state: model + optimizer, laid out on the mesh
# ----------------------------------------------------------------------------


class TrainState:
    """The (model, optimizer) state created directly in its shards, and what restores it."""

    def __init__(self, graphdef, state, sharding, abstract_state, n_params, n_active):
        self.graphdef, self.state, self.sharding = graphdef, state, sharding
        self.abstract_state, self.n_params, self.n_active = abstract_state, n_params, n_active

    @classmethod
    def create(cls, cfg: Config, mesh, rules) -> "TrainState":
        tx = make_optimizer(cfg.optim, cfg.train.steps)

        def build():
            model = build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
            return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

        abstract = nnx.eval_shape(build)
        graphdef, abstract_state = nnx.split(abstract)
        sharding = shd.state_shardings(abstract_state, mesh, rules)
        with jax.set_mesh(mesh), shd.activation_rules(mesh, rules):
            state = jax.jit(lambda: nnx.state(build()), out_shardings=sharding)()
        n_params, n_active = M.active_params(cfg.model, nnx.state(abstract[0], nnx.Param))
        return cls(graphdef, state, sharding, abstract_state, n_params, n_active)

    def restore_target(self):
        """Abstract arrays (shape, dtype, sharding of *this* mesh) for orbax restore."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nnx.to_pure_dict(self.abstract_state), nnx.to_pure_dict(self.sharding))

    def model(self):
        return nnx.merge(self.graphdef, self.state)[0]


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
    graphdef, state, state_sharding = ts.graphdef, ts.state, ts.sharding
    log.info("model: %.2fM parameters (%.2fM active non-embedding)", ts.n_params / 1e6,
             ts.n_active / 1e6)

    # -- checkpoint restore -----------------------------------------------------------------
    ckpt = Checkpointer(str(run_dir / "checkpoints"), keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    start_step, train_it = 0, iter(train_ds)
    if cfg.checkpoint.resume:
        restored = ckpt.restore_latest(ts.restore_target())
        if restored is not None:
            start_step, pure, data = restored
            nnx.replace_by_pure_dict(state, pure)
            train_it = restore_iterator(train_ds, data["input"])
            log.info("resumed from step %d of %s", start_step, ckpt.directory)

    def save(step, wait=False):
        ckpt.save(step, nnx.to_pure_dict(state), {"input": train_it.get_state(), "step": step},
                  wait=wait)

    # -- the update step: one jit over the mesh, state donated ---------------------------
    batch_sharding = shd.batch_sharding(mesh, rules)
    train_step = jax.jit(make_train_step(graphdef, t.grad_accum_steps),
                         in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, None),
                         donate_argnums=0)  # the old state's buffers hold the new one
    eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(state_sharding, batch_sharding))

    def device_batch(b):
        b = {k: v for k, v in b.items() if k in ("tokens", "targets", "loss_mask", "segment_ids")}
        return shd.to_global(b, mesh, rules)

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
    flops_per_step = M.train_flops_per_step(cfg.model, ts.n_active,
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
                    ma = train_step.lower(state, batch).compile().memory_analysis()
                    mem = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                log.info("train step memory: %.1f MiB", mem / 2**20)
                memory_logged = True
            state, metrics = train_step(state, batch)
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
