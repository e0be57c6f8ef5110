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


def cross_entropy(logits, targets, mask):
    """``logits [B, T, V]`` float32, ``targets [B, T]`` int, ``mask [B, T]`` float ->
    ``(sum of masked CE, correct count)``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets) * mask
    return (ce * mask).sum(), correct.sum()


def chunked_cross_entropy(head, x, targets, mask, *, chunk_size: int):
    """:func:`cross_entropy` of ``head(x)`` computed ``chunk_size`` tokens at a time.

    ``head``: ``[B, C, E] -> [B, C, V]`` float32 logits (a pure function of its input;
    the parameters it closes over are differentiated through the scan); ``x [B, T, E]``
    hidden states. ``T`` need not divide by ``chunk_size``: the tail is padded with
    masked positions.
    """
    if chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be >= 1")
    B, T, E = x.shape
    C = min(chunk_size, T)
    n = -(-T // C)
    pad = n * C - T
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def chunks(a):  # [B, n*C, ...] -> [n, B, C, ...]
        return a.reshape(B, n, C, *a.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint  # save only the chunk's inputs; recompute its logits in the backward
    def chunk(xc, tc, mc):
        return cross_entropy(head(xc), tc, mc)

    def body(carry, inp):
        ce, correct = chunk(*inp)
        return (carry[0] + ce, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (ce, correct), _ = jax.lax.scan(body, (zero, zero),
                                    (chunks(x), chunks(targets), chunks(mask.astype(jnp.float32))))
    return ce, correct
