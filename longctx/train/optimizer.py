"""AdamW with warmup and decay, global-norm clipping, weight decay on matrices only."""

from __future__ import annotations

import jax
import optax

from longctx.config import OptimConfig


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
