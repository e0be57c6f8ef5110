"""The first training entry point: one device, synthetic tasks, AdamW.

    python -m longctx.train --config experiments/configs/tiny.yaml [key=value ...]

Reads top to bottom: run directory and config, input stream, model and
optimizer, the jitted update step, the loop with its progress bar, evaluation.
Writes ``config.yaml`` (the resolved config) and ``metrics.jsonl`` (one row per
log step and per evaluation) into ``train.run_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from longctx.config import Config, OptimConfig, save_config, task_kwargs
from longctx.data import synthetic
from longctx.model import build_model

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
# Loss
# ----------------------------------------------------------------------------


def loss_fn(model, batch):
    """Masked next-token cross entropy (+ any ``*_loss`` term in aux, already weighted)."""
    logits, aux = model(batch["tokens"], segment_ids=batch.get("segment_ids"))
    mask = batch["loss_mask"].astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    loss = (ce * mask).sum() / denom
    loss = loss + sum(v for k, v in aux.items() if k.endswith("_loss"))
    acc = ((jnp.argmax(logits, -1) == batch["targets"]) * mask).sum() / denom
    return loss, {"loss": loss, "accuracy": acc, **aux}


@nnx.jit
def train_step(model, optimizer, batch):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return metrics


@nnx.jit
def eval_step(model, batch):
    return loss_fn(model, batch)[1]


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def batch_at(cfg: Config, step: int, *, seed: int) -> dict:
    """Batch ``step`` of the deterministic stream ``seed``: examples step*B .. step*B+B-1."""
    d, B = cfg.data, cfg.train.batch_size
    b = synthetic.make_batch(d.task, seed=seed, start_index=step * B, batch_size=B,
                             seq_len=d.seq_len, vocab_size=cfg.model.vocab_size, **task_kwargs(cfg))
    return {k: jnp.asarray(b[k]) for k in ("tokens", "targets", "loss_mask")}


def evaluate(model, cfg: Config) -> dict:
    rows = [eval_step(model, batch_at(cfg, i, seed=cfg.data.eval_seed))
            for i in range(cfg.train.eval_batches)]
    return {f"eval_{k}": float(np.mean([float(r[k]) for r in rows])) for k in rows[0]}


# ----------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------


def train(cfg: Config, *, progress: bool = True) -> dict:
    """Train ``cfg`` and return the final metrics (also written to metrics.jsonl)."""
    # -- run directory ------------------------------------------------------------
    t = cfg.train
    os.makedirs(t.run_dir, exist_ok=True)
    save_config(cfg, os.path.join(t.run_dir, "config.yaml"))
    metrics_path = os.path.join(t.run_dir, "metrics.jsonl")
    log.info("run dir %s, device %s", t.run_dir, jax.devices()[0])

    # -- model and optimizer --------------------------------------------------
    model = build_model(cfg.model, rngs=nnx.Rngs(t.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(cfg.optim, t.steps), wrt=nnx.Param)
    schedule = lr_schedule(cfg.optim, t.steps)
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log.info("model: %.2fM parameters", n_params / 1e6)

    # -- loop -------------------------------------------------------------------
    tokens_per_step = t.batch_size * cfg.data.seq_len
    final = {}
    with open(metrics_path, "a") as mf, tqdm(range(t.steps), disable=not progress,
                                             desc="train", dynamic_ncols=True) as bar:
        t_last, steps_since = time.perf_counter(), 0
        for step in bar:
            metrics = train_step(model, optimizer, batch_at(cfg, step, seed=cfg.data.seed))
            steps_since += 1
            last = step + 1 == t.steps
            if (step + 1) % t.log_every == 0 or last:
                row = {k: float(v) for k, v in metrics.items()}
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"loss is {row['loss']} at step {step + 1}")
                dt = time.perf_counter() - t_last
                row.update(step=step + 1, lr=float(schedule(step)),
                           tokens_per_s=tokens_per_step * steps_since / dt,
                           step_time_s=dt / steps_since)
                t_last, steps_since = time.perf_counter(), 0
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                final.update(row)
            if (t.eval_every and (step + 1) % t.eval_every == 0) or last:
                ev = evaluate(model, cfg)
                ev["step"] = step + 1
                mf.write(json.dumps(ev) + "\n")
                mf.flush()
                bar.write(f"step {step + 1}: eval loss {ev['eval_loss']:.4f} "
                          f"accuracy {ev['eval_accuracy']:.4f}")
                final.update(ev)
    return final
