"""Deterministic synthetic long-context tasks, in pure numpy.

Every example is a pure function of ``(seed, index)``: its generator is
``np.random.default_rng([seed, index])`` and no global random state is read or
written, so any example can be regenerated on any host, in any order, which is
what sharded data loading and exact resumption need.

Every task returns a dict of numpy arrays of length ``seq_len`` (``T``):

* ``tokens``    int32 [T]   -- model input.
* ``targets``   int32 [T]   -- next-token aligned: the logits at position ``t``
  are scored against ``targets[t]``. Unscored positions hold 0.
* ``loss_mask`` float32 [T] -- 1.0 exactly where ``targets`` is scored, else 0.0.

``passkey`` adds ``depth``, a float32 scalar array. ``make_batch`` stacks
consecutive indices into ``[B, T]`` arrays (``[B]`` for ``depth``).

Every token id is in ``[0, vocab_size)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from longctx.data import ruler, ruler_text

__all__ = [
    "mqar",
    "passkey",
    "copy",
    "selective_copy",
    "TASKS",
    "make_batch",
    "PASSKEY_PAD",
    "PASSKEY_MARK",
    "PASSKEY_QUERY",
    "PASSKEY_DIGIT0",
    "PASSKEY_FILLER0",
    "COPY_SEP",
    "SELECTIVE_COPY_BLANK",
    "SELECTIVE_COPY_SEP",
]

# Passkey vocabulary layout (see `passkey`).
PASSKEY_PAD = 0
PASSKEY_MARK = 1  # stands for "the passkey is"
PASSKEY_QUERY = 2  # stands for "what is the passkey?"
PASSKEY_DIGIT0 = 3  # digits 0-9 are ids 3..12
PASSKEY_FILLER0 = 13  # filler ids are 13..vocab_size-1

# Copy / selective-copy special ids.
COPY_SEP = 1
SELECTIVE_COPY_BLANK = 0
SELECTIVE_COPY_SEP = 1

# Token ids are stored as int32.
_MAX_VOCAB = np.iinfo(np.int32).max


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
    # SeedSequence rejects negative entries with an unhelpful message; name them.
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"{task}: {seed=} and {index=} must be non-negative")
    return np.random.default_rng([int(seed), int(index)])


def _check_vocab(task: str, vocab_size: int, minimum: int) -> None:
    if vocab_size < minimum:
        raise ValueError(f"{task}: {vocab_size=} too small: needs at least {minimum}")
    if vocab_size > _MAX_VOCAB:
        raise ValueError(f"{task}: {vocab_size=} does not fit int32 token ids")


def _example(tokens: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "tokens": tokens.astype(np.int32, copy=False),
        "targets": targets.astype(np.int32, copy=False),
        "loss_mask": loss_mask.astype(np.float32, copy=False),
    }


def mqar(
    seed: int,
    index: int,
    *,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
) -> dict[str, np.ndarray]:
    """Multi-query associative recall (MQAR).

    Recipe of Zoology (Arora et al. 2023, "Zoology: Measuring and Improving
    Recall in Efficient Language Models", section 3 / appendix; reference code
    ``zoology/data/associative_recall.py::multiquery_ar``).

    Layout, with ``n = num_kv_pairs``, ``H = vocab_size // 2``::

        position  0   1   2   3  ...  2n-2  2n-1 | 2n ..................... T-1
        tokens    k1  v1  k2  v2 ...  kn    vn   | query region
                                                 |   offset 2*g_i : key k_{pi(i)}
                                                 |   every other  : filler

    * token 0 is reserved and never emitted;
    * keys are distinct, drawn from ``[1, H)``; values from ``[H, vocab_size)``
      (values may repeat);
    * the query region has ``space = (T - 2n) // 2`` even offsets; ``n`` of
      them are chosen without replacement with ``p(g) ∝ a * g**(a-1)`` for
      ``g = 1..space`` (``a = power_a``), so queries close to the start of the
      region -- short recall distances -- are likelier; each key is queried
      exactly once, in random order;
    * at a query position ``t``: ``targets[t]`` is the value paired with
      ``tokens[t]`` and ``loss_mask[t] = 1``; everywhere else the mask is 0;
    * filler is uniform over ``[1, vocab_size)`` minus this example's keys.

    Requires ``seq_len >= 4 * num_kv_pairs`` and
    ``vocab_size // 2 - 1 >= num_kv_pairs``.
    """
    n = int(num_kv_pairs)
    T = int(seq_len)
    V = int(vocab_size)
    if n < 1:
        raise ValueError(f"mqar: {num_kv_pairs=} must be >= 1")
    if not power_a > 0:
        raise ValueError(f"mqar: {power_a=} must be > 0")
    need = 4 * n
    if T < need:
        raise ValueError(f"mqar: {seq_len=} too short for {num_kv_pairs=}: needs at least {need}")
    _check_vocab("mqar", V, 4)
    half = V // 2
    if half - 1 < n:
        raise ValueError(
            f"mqar: {vocab_size=} too small for {num_kv_pairs=}: "
            f"the key range [1, {half}) has {half - 1} ids, needs at least {n}"
        )
    rng = _rng("mqar", seed, index)

    # Keys are distinct so every query has exactly one answer; values may
    # repeat (the brief's choice; Zoology draws them without replacement).
    keys = rng.choice(np.arange(1, half), size=n, replace=False)
    values = rng.integers(half, V, size=n)

    tokens = np.empty(T, dtype=np.int64)
    targets = np.zeros(T, dtype=np.int64)
    loss_mask = np.zeros(T, dtype=np.float32)
    tokens[0 : 2 * n : 2] = keys
    tokens[1 : 2 * n : 2] = values

    # Query slots: Zoology's power law over the even offsets of the query
    # region. rng.choice draws the n slots in sequence (not sorted); the keys
    # are already in random order and independent of the slots, so slot i
    # getting key i is a uniformly random key order.
    space = (T - 2 * n) // 2
    g = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * g ** (power_a - 1.0)
    p /= p.sum()
    slots = rng.choice(space, size=n, replace=False, p=p)
    qpos = 2 * n + 2 * slots

    # Filler: the r-th id of [1, V) \ keys, for r uniform over the V-1-n such
    # ids. With sorted keys s_0 < s_1 < ..., a_i = s_i - 1 - i allowed ids lie
    # below s_i, so the r-th allowed id is r + 1 + #{i : a_i <= r}. This avoids
    # materialising the whole vocabulary per example.
    fill_len = T - 2 * n
    r = rng.integers(0, V - 1 - n, size=fill_len)
    s = np.sort(keys)
    a = s - 1 - np.arange(n)
    filler = r + 1 + np.searchsorted(a, r, side="right")
    tokens[2 * n :] = filler

    tokens[qpos] = keys
    targets[qpos] = values
    loss_mask[qpos] = 1.0
    return _example(tokens, targets, loss_mask)


def passkey(
    seed: int,
    index: int,
    *,
    seq_len: int,
    vocab_size: int,
    passkey_len: int = 5,
    depth: float | tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Passkey retrieval in a haystack of random filler.

    After the passkey test of Mohtashami & Jaggi 2023 ("Landmark Attention"),
    with words replaced by token ids. Vocabulary:

        0 pad (never emitted), 1 MARK ("the passkey is"),
        2 QUERY ("what is the passkey?"), 3..12 digits 0-9,
        13..vocab_size-1 filler (so ``vocab_size >= 16``).

    Layout, with ``n = passkey_len``, haystack length ``H = T - (n + 1)``::

        [ filler | MARK d1..dn | filler ] [ QUERY d1 .. dn ]
        <-------------- H --------------> <---- n + 1 ---->

    The needle ``MARK d1..dn`` starts at ``pos = round(depth * (H - n - 1))``:
    depth 0 puts MARK at position 0, depth 1 ends the needle just before
    QUERY. ``depth=None`` draws it uniformly in [0, 1], ``depth=(lo, hi)`` in [lo, hi].

    Loss: ``targets[T-n-1] = d1`` (at QUERY), ``targets[T-n-1+i] = d_{i+1}``
    (at the final ``d_i``), ``n`` positions in all; the last token is not
    scored. The extra key ``depth`` is the relative depth actually used,
    ``pos / (H - n - 1)`` (0 when the needle fills the haystack), as a float32
    scalar array.
    """
    n = int(passkey_len)
    T = int(seq_len)
    V = int(vocab_size)
    if n < 1:
        raise ValueError(f"passkey: {passkey_len=} must be >= 1")
    # Haystack must at least hold the needle: H = T - n - 1 >= n + 1.
    need = 2 * (n + 1)
    if T < need:
        raise ValueError(f"passkey: {seq_len=} too short for {passkey_len=}: needs at least {need}")
    _check_vocab("passkey", V, 16)
    lo, hi = (0.0, 1.0) if depth is None else (
        tuple(map(float, depth)) if isinstance(depth, (tuple, list)) else (float(depth),) * 2)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"passkey: {depth=} must be a depth or a range (lo, hi) with "
                         f"0 <= lo <= hi <= 1")
    rng = _rng("passkey", seed, index)

    digits = PASSKEY_DIGIT0 + rng.integers(0, 10, size=n)
    d = float(rng.uniform(0.0, 1.0)) if depth is None else (
        lo if lo == hi else float(rng.uniform(lo, hi)))
    H = T - (n + 1)
    span = H - (n + 1)  # last legal needle start
    pos = int(round(d * span))
    actual = pos / span if span > 0 else 0.0

    tokens = rng.integers(PASSKEY_FILLER0, V, size=T)
    tokens[pos] = PASSKEY_MARK
    tokens[pos + 1 : pos + 1 + n] = digits
    q = T - n - 1
    tokens[q] = PASSKEY_QUERY
    tokens[q + 1 :] = digits

    targets = np.zeros(T, dtype=np.int64)
    loss_mask = np.zeros(T, dtype=np.float32)
    targets[q : q + n] = digits
    loss_mask[q : q + n] = 1.0
    out = _example(tokens, targets, loss_mask)
    out["depth"] = np.asarray(actual, dtype=np.float32)
    return out


def copy(
    seed: int,
    index: int,
    *,
    seq_len: int,
    vocab_size: int,
    copy_len: int | None = None,
) -> dict[str, np.ndarray]:
    """Copy a random string after a separator (teacher forced).

    Ids: 0 pad, 1 SEP, data from ``[2, vocab_size)``. With ``n = copy_len``
    (default ``(seq_len - 1) // 2``)::

        position  0 .. n-1 | n   | n+1 .. 2n | 2n+1 .. T-1
        tokens    x1 .. xn | SEP | x1 .. xn  | 0 (pad)
        targets            | x1  | x2 .. xn, - |

    Loss on positions ``n .. 2n-1`` (SEP predicts x1, copied ``x_i`` predicts
    ``x_{i+1}``). Requires ``2 * copy_len + 1 <= seq_len``.
    """
    T = int(seq_len)
    V = int(vocab_size)
    n = (T - 1) // 2 if copy_len is None else int(copy_len)
    if n < 1:
        raise ValueError(f"copy: {copy_len=} must be >= 1 (with {seq_len=})")
    need = 2 * n + 1
    if T < need:
        raise ValueError(f"copy: {seq_len=} too short for {copy_len=}: needs at least {need}")
    _check_vocab("copy", V, 3)
    rng = _rng("copy", seed, index)

    x = rng.integers(2, V, size=n)
    tokens = np.zeros(T, dtype=np.int64)
    tokens[:n] = x
    tokens[n] = COPY_SEP
    tokens[n + 1 : 2 * n + 1] = x
    targets = np.zeros(T, dtype=np.int64)
    loss_mask = np.zeros(T, dtype=np.float32)
    targets[n : 2 * n] = x
    loss_mask[n : 2 * n] = 1.0
    return _example(tokens, targets, loss_mask)


def selective_copy(
    seed: int,
    index: int,
    *,
    seq_len: int,
    vocab_size: int,
    num_tokens: int = 16,
) -> dict[str, np.ndarray]:
    """Selective copying (Gu & Dao 2023, "Mamba", section 3.1).

    Ids: 0 blank/noise, 1 SEP, data from ``[2, vocab_size)``. With
    ``k = num_tokens`` and ``L = T - k - 1``::

        position  0 ........ L-1 | L   | L+1 .. T-1
        tokens    blanks, with   | SEP | d1 .. dk
                  d1..dk at random sorted positions
        targets                  | d1  | d2 .. dk, -

    Unlike the paper's version, the output part is teacher forced (it holds
    the data tokens, not blanks), so the task reads as next-token prediction.
    Loss on positions ``L .. T-2``. Requires ``seq_len >= 2 * num_tokens + 1``.
    """
    T = int(seq_len)
    V = int(vocab_size)
    k = int(num_tokens)
    if k < 1:
        raise ValueError(f"selective_copy: {num_tokens=} must be >= 1")
    need = 2 * k + 1
    if T < need:
        raise ValueError(
            f"selective_copy: {seq_len=} too short for {num_tokens=}: needs at least {need}"
        )
    _check_vocab("selective_copy", V, 3)
    rng = _rng("selective_copy", seed, index)

    L = T - k - 1
    data = rng.integers(2, V, size=k)
    where = np.sort(rng.choice(L, size=k, replace=False))
    tokens = np.full(T, SELECTIVE_COPY_BLANK, dtype=np.int64)
    tokens[where] = data
    tokens[L] = SELECTIVE_COPY_SEP
    tokens[L + 1 :] = data
    targets = np.zeros(T, dtype=np.int64)
    loss_mask = np.zeros(T, dtype=np.float32)
    targets[L : L + k] = data
    loss_mask[L : L + k] = 1.0
    return _example(tokens, targets, loss_mask)


TASKS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "mqar": mqar,
    "passkey": passkey,
    "copy": copy,
    "selective_copy": selective_copy,
    **ruler.TASKS,  # RULER-style suite (longctx/data/ruler.py) and its mixture "ruler"
    "niah_text": ruler_text.niah_text,  # RULER's text template, byte ids (data/ruler_text.py)
}


def make_batch(
    task: str,
    *,
    seed: int,
    start_index: int,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    **task_kwargs,
) -> dict[str, np.ndarray]:
    """Stack examples ``start_index .. start_index + batch_size - 1`` of a task.

    Returns ``tokens``/``targets`` int32 [B, T], ``loss_mask`` float32 [B, T],
    and for passkey also ``depth`` float32 [B]. ``task_kwargs`` go to the task
    function (e.g. ``num_kv_pairs`` for mqar).
    """
    if task not in TASKS:
        raise ValueError(f"make_batch: unknown {task=}; known tasks: {sorted(TASKS)}")
    if batch_size < 1:
        raise ValueError(f"make_batch: {batch_size=} must be >= 1")
    fn = TASKS[task]
    examples = [
        fn(seed, start_index + i, seq_len=seq_len, vocab_size=vocab_size, **task_kwargs)
        for i in range(batch_size)
    ]
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}
