"""Distillation from a frozen parent: the loss, its schedule, and the parent in the trainer.

Knowledge inheritance (Qin et al. 2022): the child's loss is ::

    (1 - a_t) CE(child, targets) + a_t T^2 KL(softmax(parent / T) || softmax(child / T))

per scored token (``loss_mask``), averaged like the plain cross entropy, with
``a_t = distill.alpha`` decayed linearly to 0 over ``distill.steps``
(:class:`longctx.inherit.distill_config.DistillConfig`); ``T^2`` keeps the KL's gradient on the
scale of the CE's as ``T`` changes (Hinton et al. 2015). With ``a = 0`` it is exactly
:func:`longctx.train.step.loss_fn`.

In the trainer (``distill.alpha > 0``): the parent run directory's config and
newest checkpoint are restored model-only onto the trainer's mesh with the same rules
(sharded like the child), frozen, and passed to the one jitted step, which runs the
parent's forward first and puts its logits ``[B, T, vocab]`` into the batch
(``parent_logits``), so gradient accumulation slices them with the tokens. Parents and
children scanned in segments (``model.segment_len > 0`` with longer sequences) are not
supported: the windowed loss never materialises the child's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from etils import epath
from flax import nnx

from longctx.config import Config, ConfigError, load_config
from longctx.inherit.distill_config import DistillConfig
from longctx.train.checkpoint import Checkpointer
from longctx.train.state import TrainState
from longctx.train.step import aux_loss


def distill_terms(logits, parent_logits, targets, mask, *, temperature: float = 1.0):
    """Summed masked CE and ``T^2``-scaled KL(parent || child) over ``[B, T, V]`` logits.

    ``targets [B, T]`` int, ``mask [B, T]`` float. Returns ``(ce_sum, kl_sum)``, float32.
    """
    lf = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(lf, targets)
    T = temperature
    log_q = jax.nn.log_softmax(lf / T, axis=-1)  # child
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(parent_logits).astype(jnp.float32) / T,
                               axis=-1)  # parent: a constant
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * (T * T)  # [B, T]
    return (ce * mask).sum(), (kl * mask).sum()


def distill_loss_fn(model, batch, denom=None, *, alpha, temperature: float = 1.0):
    """:func:`longctx.train.step.loss_fn` with the KL to ``batch["parent_logits"]`` mixed in.

    ``alpha`` a scalar (array or float) in [0, 1]; returns ``(loss, metrics)`` with
    ``ce`` and ``kl`` (per scored token) and ``distill_alpha`` among the metrics.
    """
    logits, aux = model(batch["tokens"], segment_ids=batch.get("segment_ids"))
    mask = batch["loss_mask"].astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0) if denom is None else denom
    ce, kl = distill_terms(logits, batch["parent_logits"], batch["targets"], mask,
                           temperature=temperature)
    correct = ((jnp.argmax(logits, -1) == batch["targets"]) * mask).sum()
    loss = ((1.0 - alpha) * ce + alpha * kl) / denom + aux_loss(aux)
    return loss, {"loss": loss, "accuracy": correct / denom, "ce": ce / denom,
                  "kl": kl / denom, "distill_alpha": jnp.asarray(alpha, jnp.float32), **aux}


class Distiller:
    """What :func:`longctx.train.step.make_train_step` needs to distil from a parent."""

    def __init__(self, parent_graphdef, dcfg: DistillConfig):
        self.parent_graphdef, self.dcfg = parent_graphdef, dcfg

    def parent_logits(self, parent_state, batch):
        """The frozen parent's logits ``[B, T, vocab]`` on the batch (no gradient)."""
        parent = nnx.merge(self.parent_graphdef, parent_state)[0]
        logits, _ = parent(batch["tokens"], segment_ids=batch.get("segment_ids"))
        return jax.lax.stop_gradient(logits)

    def loss(self, step):
        """``(model, batch, denom) -> (loss, metrics)`` at optimizer step ``step``."""
        alpha = self.dcfg.alpha_at(step)
        return lambda m, b, d: distill_loss_fn(m, b, d, alpha=alpha,
                                               temperature=self.dcfg.temperature)


def load_parent(cfg: Config, mesh, rules):
    """``(Distiller, parent_state, parent_sharding)`` for ``cfg.distill``, on ``mesh``."""
    dcfg = cfg.distill
    path = epath.Path(dcfg.parent) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"distill.parent={dcfg.parent!r}: no config.yaml there (expected "
                          "a longctx run directory)")
    pcfg = load_config(str(path))
    if pcfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"distill.parent has vocab_size={pcfg.model.vocab_size}; the "
                          f"child has model.vocab_size={cfg.model.vocab_size}")
    for name, m in (("parent", pcfg.model), ("child", cfg.model)):
        if m.segment_len and cfg.data.seq_len > m.segment_len:
            raise ConfigError(f"distillation needs one-pass models; the {name} scans "
                              f"segments (model.segment_len={m.segment_len} < "
                              f"data.seq_len={cfg.data.seq_len})")
    if cfg.train.loss_chunk_size:
        raise ConfigError(f"distillation compares full logits; train.loss_chunk_size="
                          f"{cfg.train.loss_chunk_size} (chunked cross entropy) cannot be "
                          "combined with distill.alpha > 0: set it to 0")
    ts = TrainState.create(pcfg, mesh, rules, with_optimizer=False)
    ckpt = Checkpointer(str(epath.Path(dcfg.parent) / "checkpoints"), async_save=False)
    restored = ts.restore(ckpt)
    ckpt.close()
    if restored is None:
        raise ConfigError(f"distill.parent={dcfg.parent!r}: no readable checkpoint")
    return Distiller(ts.graphdef, dcfg), ts.state, ts.sharding
