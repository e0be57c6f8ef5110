"""Perplexity by position on held-out token files: does far context lower the loss?

    python -m longctx.evals --run-dir runs/text --task perplexity --lengths 1024 4096 \\
        [--data held_out.bin | prepared_dir]            # default: the run's data.eval_path

Held-out tokens come from ``--data`` or ``data.eval_path``:

* a prepared directory (``python -m longctx.data.prepare``): ``meta.json`` gives
  ``dtype`` (uint16/uint32) and ``vocab_size``; the shards are its ``*.bin`` files
  in name order, read as one stream;
* a ``.bin`` file (``numpy.tofile`` layout) of ``data.token_dtype`` ids, the
  trainer's ``tokens`` source convention (several files: comma-separated).

For each evaluated length ``L``, ``examples`` windows of ``L + 1`` tokens are read
at evenly spaced offsets of the stream (deterministic; windows may cross document
boundaries: the stream is read as the model would read a long document). The
model reads tokens ``0..L-1`` of a window and position ``t`` is scored on token
``t + 1``; the per-position loss (nats), averaged over the windows, is averaged
again over log-spaced buckets of positions ``[0, 1), [1, 2), [2, 4), ..., [2^k,
L)`` (plus the trained length as an edge). A row per bucket: ``{task: "perplexity", length, pos_lo, pos_hi, loss, ppl,
count, beyond_trained}``, ``beyond_trained`` when the bucket starts at or past the
trained ``data.seq_len``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.data.sources import TOKEN_DTYPES, check_token_ids

__all__ = ["load_tokens", "position_loss", "buckets", "perplexity_eval"]


def load_tokens(path: str, *, dtype: str = "uint16", vocab_size: int | None = None):
    """The held-out stream at ``path`` as one 1-D integer array (memory-mapped shards concatenated).

    ``path``: a directory with ``meta.json``, or ``.bin`` file(s) (comma-separated) of
    ``dtype``. ``vocab_size``: a prepared directory whose ``meta.json`` declares a larger
    vocabulary is refused.
    """
    if os.path.isdir(path):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{path!r} is a directory without meta.json (not a "
                                    f"prepared directory: python -m longctx.data.prepare)")
        with open(meta_path) as f:
            meta = json.load(f)
        dtype = meta.get("dtype", dtype)
        if vocab_size is not None and int(meta.get("vocab_size", 0)) > vocab_size:
            raise ValueError(f"{meta_path}: vocab_size={meta['vocab_size']} exceeds the model's "
                             f"vocab_size={vocab_size}")
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".bin"))
        if not files:
            raise FileNotFoundError(f"no *.bin shards in prepared directory {path!r}")
    else:
        files = path.split(",")
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token {dtype=} of {path!r}; expected one of {sorted(TOKEN_DTYPES)}")
    parts = []
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"token file {f!r} not found")
        itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
        if os.path.getsize(f) % itemsize:
            raise ValueError(f"corrupt token file {f!r}: size {os.path.getsize(f)} is not a "
                             f"multiple of {itemsize} (dtype {dtype})")
        if os.path.getsize(f):
            parts.append(np.memmap(f, dtype=TOKEN_DTYPES[dtype], mode="r"))
    return np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.zeros(0))


@nnx.jit
def _nll(model, window):
    """window int32 [B, L + 1] -> per-position cross entropy float32 [B, L] (nats)."""
    logits, _ = model(window[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, window[:, 1:, None], axis=-1)[..., 0]


def position_loss(model, tokens, *, length: int, examples: int, vocab_size: int,
                  batch_size: int = 4) -> np.ndarray:
    """Mean loss at each position, float64 [length], over ``examples`` evenly spaced windows."""
    n = len(tokens)
    if n < length + 1:
        raise ValueError(f"perplexity: {length=} needs {length + 1} held-out tokens, the file "
                         f"has {n}")
    if examples < 1:
        raise ValueError(f"perplexity: {examples=} must be >= 1")
    starts = np.linspace(0, n - length - 1, examples).astype(np.int64)
    total = np.zeros(length)
    for b in range(0, examples, batch_size):
        win = np.stack([np.asarray(tokens[s:s + length + 1]) for s in starts[b:b + batch_size]])
        for s, w in zip(starts[b:b + batch_size], win):
            check_token_ids(w, vocab_size, lambda k, s=s: f"held-out token {s + k}")
        total += np.asarray(_nll(model, jnp.asarray(win, jnp.int32)), np.float64).sum(0)
    return total / examples


def buckets(length: int, split: int | None = None) -> list[tuple[int, int]]:
    """Log-spaced position buckets ``[0, 1), [1, 2), [2, 4), ... , [2^k, length)``.

    ``split`` (the trained length) is added as an edge, so no bucket straddles it.
    """
    edges = [0] + [2**i for i in range(int(np.log2(max(length - 1, 1))) + 1) if 2**i < length]
    if split is not None and 0 < split < length:
        edges = sorted(set(edges) | {int(split)})
    return list(zip(edges, edges[1:] + [length]))


def perplexity_eval(model, cfg, *, lengths, examples=8, path=None, batch_size=4):
    """Bucket rows per length (module docstring); ``path`` default ``cfg.data.eval_path``."""
    path = path or cfg.data.eval_path
    if path is None:
        raise ValueError("perplexity: no held-out tokens: set data.eval_path (or --data PATH)")
    V = cfg.model.vocab_size
    tokens = load_tokens(path, dtype=cfg.data.token_dtype, vocab_size=V)
    rows = []
    for L in lengths:
        curve = position_loss(model, tokens, length=int(L), examples=examples, vocab_size=V,
                              batch_size=batch_size)
        for lo, hi in buckets(int(L), split=cfg.data.seq_len):
            loss = float(curve[lo:hi].mean())
            rows.append({"task": "perplexity", "length": int(L), "pos_lo": lo, "pos_hi": hi,
                         "loss": loss, "ppl": float(np.exp(loss)), "count": (hi - lo) * examples,
                         "beyond_trained": lo >= cfg.data.seq_len})
    return rows
