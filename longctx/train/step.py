"""The loss, the windowed loss of segment-scanned models, and the jitted train / eval steps.

Everything here asks the model (``model.runs_in_segments``, ``model.post_update``)
instead of testing a backend name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from longctx.model import segments
from longctx.train.loss import chunked_cross_entropy, cross_entropy

# Fill of each batch field past the end of a sequence padded to whole segments: masked.
PAD_FILL = {"tokens": 0, "targets": 0, "loss_mask": 0, "segment_ids": -1}


def _metrics_of(model, x, batch, mask, chunk_size):
    """Summed masked cross entropy and number of correct argmax predictions of the
    hidden states ``x [B, T, E]``: the head applied at once (``chunk_size`` 0) or
    ``chunk_size`` tokens at a time, never holding ``[B, T, vocab]``."""
    if not chunk_size:
        return cross_entropy(model.head(x), batch["targets"], mask)
    graphdef, state = nnx.split(model)  # a pure head: merged afresh inside the scan
    head = lambda xc: nnx.merge(graphdef, state).head(xc)  # noqa: E731
    return chunked_cross_entropy(head, x, batch["targets"], mask, chunk_size=chunk_size)


def aux_loss(aux) -> jax.Array:
    """The sum of the ``*_loss`` terms a model reports in ``aux`` (already weighted)."""
    return sum(v for k, v in aux.items() if k.endswith("_loss"))


def loss_fn(model, batch, denom=None, *, chunk_size: int = 0):
    """Masked next-token cross entropy (+ any ``*_loss`` term in aux, already weighted).

    ``denom``: the number of scored tokens to normalise by; gradient accumulation
    passes the whole batch's count so that the summed microbatch gradients equal
    the full batch's gradient exactly. ``chunk_size`` (``train.loss_chunk_size``):
    0 = logits at once, else the chunked cross entropy of :mod:`longctx.train.loss`.
    """
    x, aux = model.hidden(batch["tokens"], segment_ids=batch.get("segment_ids"))
    mask = batch["loss_mask"].astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0) if denom is None else denom
    ce, correct = _metrics_of(model, x, batch, mask, chunk_size)
    loss = ce / denom + aux_loss(aux)
    return loss, {"loss": loss, "accuracy": correct / denom, **aux}


def segment_value_and_grad(model_def, model_state, batch, denom, *, grads: bool = True,
                           chunk_size: int = 0):
    """Loss, metrics (and gradients) of a segment-scanned model, window by window.

    The value and gradient of :func:`loss_fn` on ``model(tokens)`` for
    ``model.segment_len = N`` and ``model.bptt_segments = k`` (``k = 0``: one window
    of every segment, full BPTT), computed so that memory does not grow with the
    length: a ``lax.scan`` over windows of ``k`` segments, each window's
    ``value_and_grad`` taken on its own and the gradients summed in the carry.
    Inside a window the model's own segment engine
    (:func:`longctx.model.segments.scan_segments`, the same slicing and BPTT cut as
    ``model(tokens)``; the cut falls exactly on each window's first segment), each
    segment reducing its logits to the summed cross entropy at once, so no
    ``[B, T, vocab]`` array exists. Only the carried state and one window's
    residuals are ever alive. The sequence is padded to whole windows with masked
    tokens after the end, which causality keeps invisible; ``*_loss`` aux terms are
    averaged over the real segments as in ``model(tokens)``.

    Returns ``((loss, metrics), grads)`` (``grads`` None with ``grads=False``).
    """
    model = nnx.merge(model_def, model_state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # differentiate Params only
    cfg = model.cfg
    N = cfg.segment_len
    B, T = batch["tokens"].shape
    n = segments.num_segments(T, N)  # real segments
    k = cfg.bptt_segments or n
    W = -(-n // k)  # windows
    data = segments.pad_time({name: v for name, v in batch.items() if name in PAD_FILL},
                             W * k * N, PAD_FILL)

    def segment(ps, state, x, i):  # one segment: its summed cross entropy, not its logits
        m = nnx.merge(graphdef, ps, rest)
        h, aux, state = m.hidden_step(x["tokens"], state, segment_ids=x.get("segment_ids"))
        ce, correct = _metrics_of(m, h, x, x["loss_mask"].astype(jnp.float32), chunk_size)
        real = (i < n).astype(jnp.float32)  # padding segments: no aux
        return state, (ce, correct, jax.tree.map(lambda a: a * real / n, aux))

    def window_loss(ps, state, w):  # w: the window's index
        fresh = nnx.merge(graphdef, ps, rest).init_state(B)  # may hold parameters (memory tokens)
        state = jax.tree.map(lambda f, s: jnp.where(w == 0, f, s), fresh, state)
        state, (ce, correct, aux) = segments.scan_segments(
            segment, ps, state, data, w * k + jnp.arange(k, dtype=jnp.int32),
            segment_len=N, bptt=cfg.bptt_segments)
        aux = jax.tree.map(lambda a: jnp.sum(a, axis=0), aux)  # this window's share of the mean
        loss = ce.sum() / denom + aux_loss(aux)
        return loss, (state, correct.sum(), aux)

    window = jax.value_and_grad(window_loss, has_aux=True) if grads else None

    def body(carry, w):
        state, loss, correct, aux, acc = carry
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


def make_train_step(graphdef, accum_steps: int, *, loss_chunk_size: int = 0, distill=None):
    """``(state, batch) -> (state, metrics)``: grads (accumulated), one optimizer update.

    ``loss_chunk_size`` (``train.loss_chunk_size``): the cross entropy ``C`` tokens at a
    time, never ``[B, T, vocab]`` logits (0 = at once).

    ``distill``: a :class:`longctx.train.distill.Distiller`; the step is then
    ``(state, batch, parent_state)`` and its loss mixes in the KL to the frozen parent.
    """

    def step(state, batch, parent_state=None):
        model, optimizer = nnx.merge(graphdef, state)
        model_def, model_state = nnx.split(model)
        denom = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        segmented = model.runs_in_segments(batch["tokens"].shape[1])
        loss = functools.partial(loss_fn, chunk_size=loss_chunk_size)
        if distill is not None:  # the parent's logits ride in the batch (sliced by accumulation)
            batch = {**batch, "parent_logits": distill.parent_logits(parent_state, batch)}
            loss = distill.loss(optimizer.step[...])

        def grads_of(model_state, batch):  # pure in the model's state: safe inside lax.scan
            if segmented:  # memory independent of length (truncated BPTT window by window)
                (_, metrics), grads = segment_value_and_grad(model_def, model_state, batch, denom,
                                                             chunk_size=loss_chunk_size)
                return grads, metrics
            fn = lambda m: loss(m, batch, denom)  # noqa: E731
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
        model.post_update(grads)  # modules' own hooks (MoE aux-loss-free balancing)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return nnx.state((model, optimizer)), metrics

    return step


def make_eval_step(graphdef, *, loss_chunk_size: int = 0):
    """``(state, batch) -> metrics`` of the model in a (model, optimizer) state."""

    def step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        if model.runs_in_segments(batch["tokens"].shape[1]):
            model_def, model_state = nnx.split(model)
            denom = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
            return segment_value_and_grad(model_def, model_state, batch, denom, grads=False,
                                          chunk_size=loss_chunk_size)[0][1]
        return loss_fn(model, batch, chunk_size=loss_chunk_size)[1]

    return step
