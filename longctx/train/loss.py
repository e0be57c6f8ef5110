"""Next-token cross entropy: the plain form and a chunked form that never holds ``[B, T, V]``.

With a 128K vocabulary at 32K tokens the float32 logits of one sequence are 16 GiB
(and their gradient as much again). ``train.loss_chunk_size = C > 0`` computes the
head and the cross entropy ``C`` tokens at a time: a ``lax.scan`` over time chunks
whose body is wrapped in ``jax.checkpoint``, so the forward keeps only the running
sums and the backward recomputes each chunk's logits ``[B, C, V]`` from the hidden
states, one chunk alive at a time (the head's weight gradient accumulates across
chunks). Same loss and gradients as :func:`cross_entropy` on the full logits (the
reference, beside it), at the price of one more head matmul in the backward.

Both return ``(summed masked cross entropy, number of correct argmax predictions)``;
the caller normalises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from longctx.parallel import context


def cross_entropy(logits, targets, mask):
    """``logits [B, T, V]`` float32, ``targets [B, T]`` int, ``mask [B, T]`` float ->
    ``(sum of masked CE, correct count)``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets) * mask
    return (ce * mask).sum(), correct.sum()


def chunked_cross_entropy(head, x, targets, mask, *, chunk_size: int, shards: int | None = None):
    """:func:`cross_entropy` of ``head(x)`` computed ``chunk_size`` tokens at a time.

    ``head``: ``[B, C, E] -> [B, C, V]`` float32 logits (a pure function of its input;
    the parameters it closes over are differentiated through the scan); ``x [B, T, E]``
    hidden states. ``T`` need not divide by ``chunk_size``: the tail is padded with
    masked positions.

    ``shards``: the devices the sequence is split over (context parallelism; default: the
    current mesh's ``sequence`` axis). The loss is a sum over tokens, so a chunk need not
    be contiguous: each chunk takes ``chunk_size / shards`` consecutive tokens from every
    shard, and each device computes the logits of its own tokens only. Contiguous
    chunks of a sequence-sharded ``x`` would each live on one device, and slicing them out
    of the scan made XLA gather the whole ``x`` onto every device.
    """
    if chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be >= 1")
    P = context.axis_size("sequence") if shards is None else shards
    B, T, E = x.shape
    if T % P:
        raise ValueError(f"the sequence ({T} tokens) does not divide over {P} shards")
    c = max(1, min(chunk_size, T) // P)  # tokens per shard and chunk
    n = -(-(T // P) // c)  # chunks
    pad = n * c - T // P  # per shard

    def chunks(a):  # [B, T, ...] -> [B, P, n, c, ...]: shard p's chunk j is [:, p, j]
        a = a.reshape(B, P, T // P, *a.shape[2:])
        if pad:
            a = jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3))
        return a.reshape(B, P, n, c, *a.shape[3:])

    xs, ts, ms = chunks(x), chunks(targets), chunks(mask.astype(jnp.float32))

    @jax.checkpoint  # save only the chunk's inputs; recompute its logits in the backward
    def chunk(xc, tc, mc):
        return cross_entropy(head(xc.reshape(B, P * c, E)), tc.reshape(B, P * c),
                             mc.reshape(B, P * c))

    def body(carry, j):  # a slice of the unsplit chunk axis: no data leaves its device
        take = lambda a: jax.lax.dynamic_index_in_dim(a, j, axis=2, keepdims=False)  # noqa: E731
        ce, correct = chunk(take(xs), take(ts), take(ms))
        return (carry[0] + ce, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (ce, correct), _ = jax.lax.scan(body, (zero, zero), jnp.arange(n))
    return ce, correct
