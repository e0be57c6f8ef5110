"""RULER-style synthetic long-context tasks over token ids, in pure numpy.

After Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?" (section 3): needle-in-a-haystack (single, multi-key,
multi-value, multi-query), variable tracking (multi-hop) and common- /
frequent-word extraction (aggregation). Words and sentences become token ids:
a few ids are reserved as markers standing for the template's phrases, every
other id of the model's vocabulary is a "word".

Like ``longctx.data.synthetic`` (same conventions, registered in its ``TASKS``),
every example is a pure function of ``(seed, index)`` (``default_rng([seed,
index, task number])``), any ``seq_len``, and returns ``tokens``/``targets`` int32
[T], ``loss_mask`` float32 [T] and ``depth`` float32 [] (the depth actually used;
-1 for the aggregation tasks, which have none).

Layout: ``[ haystack (H tokens) | question | answer ]``, ``H = T - len(question)
- len(answer)``. The answer is teacher forced: position ``t`` is scored
(``loss_mask[t] = 1``, ``targets[t] = tokens[t + 1]``) exactly when ``tokens[t +
1]`` is an answer token, so nothing before the question is ever scored and the
last token is not scored.

Vocabulary (``vocab_size >= 32``)::

    0 PAD (never emitted)   1 NEEDLE "the special magic number for"   2 QUERY "what is ..."
    3 ASSIGN "VAR x = y"    4 COMMON "the most common words are"      5 FREQUENT "... most frequent"
    6 .. vocab_size-1: words (filler, keys, values, variables)

Needles are inserted into a haystack of uniform random words. ``depth`` places
the answer-bearing needle (the first one, for several) as RULER does: after
``round(depth * F)`` of the ``F`` filler tokens (0: first, 1: last); the other
needles go after uniformly random filler offsets. ``depth=None`` draws it in [0,
1], ``(lo, hi)`` in [lo, hi].

Tasks (answer, in order):

* ``niah_single``: one needle ``NEEDLE k v1..vn``; question ``QUERY k``;
  answer ``v1..vn``.
* ``niah_multikey``: ``num_needles`` needles with distinct keys (distractors),
  one queried.
* ``niah_multivalue``: ``num_values`` needles with the same key, distinct
  values; answer every value, in order of appearance.
* ``niah_multiquery``: ``num_needles`` needles, ``num_queries`` of them queried:
  ``QUERY k1 v(k1) QUERY k2 v(k2) ...``; the ``QUERY``/key tokens are given,
  the values scored.
* ``vt`` (variable tracking): ``num_chains`` chains ``ASSIGN x1 c``,
  ``ASSIGN x2 x1`` .. ``ASSIGN xh x(h-1)`` (``h = num_hops``, statements in
  chain order at random places, the first of the queried chain at ``depth``);
  question ``QUERY c``; answer ``x1 .. xh``, every variable whose value is
  ``c``. Variables and constants are distinct ids.
* ``cwe`` (common words): the haystack is only words; ``num_common`` words occur
  ``2r`` times each, every other word at most ``r`` times; question
  ``COMMON``; answer the common words in order of first appearance.
* ``fwe`` (frequent words): word counts follow Zipf's law (``alpha``) over a
  random ranking of the words, strictly decreasing over the first
  ``num_frequent + 1`` ranks; question ``FREQUENT``; answer the
  ``num_frequent`` most frequent words, most frequent first.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["TASKS", "RULER_TASKS", "PAD", "NEEDLE", "QUERY", "ASSIGN", "COMMON", "FREQUENT",
           "WORD0", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
           "vt", "cwe", "fwe", "ruler"]

PAD, NEEDLE, QUERY, ASSIGN, COMMON, FREQUENT = 0, 1, 2, 3, 4, 5
WORD0 = 6  # first word id
MIN_VOCAB = 32
_MAX_VOCAB = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"{task}: {seed=} and {index=} must be non-negative")
    # The task's number keeps two tasks at the same (seed, index) independent.
    return np.random.default_rng([int(seed), int(index), RULER_TASKS.index(task)])


def _check(task: str, vocab_size: int, **positive) -> None:
    if not MIN_VOCAB <= vocab_size <= _MAX_VOCAB:
        raise ValueError(f"{task}: {vocab_size=} must be in [{MIN_VOCAB}, {_MAX_VOCAB}]")
    for name, v in positive.items():
        if int(v) < 1:
            raise ValueError(f"{task}: {name}={v} must be >= 1")


def draw_depth(task: str, rng, depth) -> float:
    """The needle depth of one example: ``depth`` (a number), uniform in ``(lo, hi)``, or
    uniform in [0, 1] when None (shared with the text template, ``ruler_text``)."""
    if depth is None:
        return float(rng.uniform(0.0, 1.0))
    lo, hi = (tuple(map(float, depth)) if isinstance(depth, (tuple, list))
              else (float(depth),) * 2)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{task}: {depth=} must be a depth or a range (lo, hi) with "
                         f"0 <= lo <= hi <= 1")
    return lo if lo == hi else float(rng.uniform(lo, hi))


def _words(rng, vocab_size: int, n: int, *, distinct: bool = False) -> np.ndarray:
    if distinct:
        return rng.choice(np.arange(WORD0, vocab_size), size=n, replace=False)
    return rng.integers(WORD0, vocab_size, size=n)


def finish_example(task, seq_len, parts, depth) -> dict[str, np.ndarray]:
    """``parts``: (token array, is_answer) in order -> the example dict.

    Answer tokens are teacher forced: position ``t`` is scored iff ``tokens[t + 1]``
    belongs to an answer part, with ``targets[t] = tokens[t + 1]``.
    """
    tokens = np.concatenate([np.asarray(a, np.int64) for a, _ in parts])
    assert tokens.size == seq_len, (task, tokens.size, seq_len)
    is_answer = np.concatenate([np.full(len(a), bool(ans)) for a, ans in parts])
    scored = np.flatnonzero(is_answer) - 1
    targets = np.zeros(seq_len, np.int64)
    loss_mask = np.zeros(seq_len, np.float32)
    targets[scored] = tokens[scored + 1]
    loss_mask[scored] = 1.0
    return {"tokens": tokens.astype(np.int32), "targets": targets.astype(np.int32),
            "loss_mask": loss_mask, "depth": np.asarray(depth, np.float32)}


def _haystack(task, rng, *, length, vocab_size, needles, pinned, depth, after=None):
    """Random words of ``length`` tokens with ``needles`` (list of int arrays) inserted.

    ``needles[pinned]`` goes after ``round(depth * F)`` filler tokens (``F`` = length
    minus the needles), the others after uniformly random filler offsets; those
    flagged in ``after`` (bool [len(needles)]) not before the pinned one (the other
    values of its key, so that the pinned needle is its key's first). Returns
    (tokens [length], start position of each needle).
    """
    F = length - sum(len(n) for n in needles)
    if F < 0:
        raise ValueError(f"{task}: seq_len too short: the needles take "
                         f"{length - F} tokens, more than the {length} of the haystack")
    first = int(round(depth * F))
    after = np.zeros(len(needles), bool) if after is None else np.asarray(after)
    offsets = np.where(after, rng.integers(first, F + 1, size=len(needles)),
                       rng.integers(0, F + 1, size=len(needles)))
    offsets[pinned] = first
    ranks = np.arange(len(needles))  # equal offsets: the pinned needle (0) first
    filler = _words(rng, vocab_size, F)
    out, starts, prev = [], np.zeros(len(needles), np.int64), 0
    pos = 0
    for i in np.lexsort((ranks, offsets)):
        out.append(filler[prev:offsets[i]])
        pos += offsets[i] - prev
        prev = offsets[i]
        starts[i] = pos
        out.append(needles[i])
        pos += len(needles[i])
    out.append(filler[prev:])
    return np.concatenate(out), starts


def _needle_depth(F: int, d: float) -> float:
    return round(d * F) / F if F > 0 else 0.0


# ----------------------------------------------------------------------------
# Needle in a haystack
# ----------------------------------------------------------------------------


def _niah(task, seed, index, *, seq_len, vocab_size, num_keys, num_values, queried, value_len,
          depth):
    """``num_keys`` distinct keys, ``num_values`` needles per key; the first ``queried`` asked.

    Tail: ``QUERY k1 <values of k1> QUERY k2 <values of k2> ...``; only the values are
    scored (the later ``QUERY k`` are given, as the next question of a conversation).
    """
    _check(task, vocab_size, value_len=value_len, num_keys=num_keys, num_values=num_values)
    if num_keys > vocab_size - WORD0:
        raise ValueError(f"{task}: {vocab_size=} too small for {num_keys} distinct keys")
    rng = _rng(task, seed, index)
    d = draw_depth(task, rng, depth)
    keys = _words(rng, vocab_size, num_keys, distinct=True)  # random order: key 0 is random
    needles, owner = [], []
    for j, k in enumerate(keys):
        # a key's values are distinct from each other, so each needle is a distinct answer
        vals = [_words(rng, vocab_size, value_len) for _ in range(num_values)]
        while len({tuple(v) for v in vals}) < num_values:
            vals = [_words(rng, vocab_size, value_len) for _ in range(num_values)]
        for v in vals:
            needles.append(np.concatenate([[NEEDLE, k], v]))
            owner.append(j)
    H = seq_len - queried * (2 + num_values * value_len)
    hay, starts = _haystack(task, rng, length=H, vocab_size=vocab_size, needles=needles,
                            pinned=0, depth=d, after=np.asarray(owner) == 0)
    parts = [(hay, False)]
    order = np.argsort(starts, kind="stable")
    for j in range(queried):
        parts.append((np.asarray([QUERY, keys[j]]), False))
        parts.append((np.concatenate([needles[i][2:] for i in order if owner[i] == j]), True))
    return finish_example(task, seq_len, parts,
                          _needle_depth(H - sum(map(len, needles)), d))


def niah_single(seed, index, *, seq_len, vocab_size, value_len=4, depth=None):
    """One needle ``NEEDLE k v1..vn``, question ``QUERY k``, answer ``v1..vn``."""
    return _niah("niah_single", seed, index, seq_len=seq_len, vocab_size=vocab_size,
                 num_keys=1, num_values=1, queried=1, value_len=value_len, depth=depth)


def niah_multikey(seed, index, *, seq_len, vocab_size, num_needles=4, value_len=4, depth=None):
    """``num_needles`` needles with distinct keys; the one at ``depth`` is queried."""
    return _niah("niah_multikey", seed, index, seq_len=seq_len, vocab_size=vocab_size,
                 num_keys=num_needles, num_values=1, queried=1, value_len=value_len, depth=depth)


def niah_multivalue(seed, index, *, seq_len, vocab_size, num_values=4, value_len=2, depth=None):
    """``num_values`` needles of one key; answer all values in order of appearance."""
    return _niah("niah_multivalue", seed, index, seq_len=seq_len, vocab_size=vocab_size,
                 num_keys=1, num_values=num_values, queried=1, value_len=value_len, depth=depth)


def niah_multiquery(seed, index, *, seq_len, vocab_size, num_needles=4, num_queries=2,
                    value_len=2, depth=None):
    """``num_needles`` distinct keys, ``num_queries`` asked in turn (the first at ``depth``)."""
    if not 1 <= int(num_queries) <= int(num_needles):
        raise ValueError(f"niah_multiquery: {num_queries=} must be in [1, {num_needles=}]")
    return _niah("niah_multiquery", seed, index, seq_len=seq_len, vocab_size=vocab_size,
                 num_keys=num_needles, num_values=1, queried=num_queries, value_len=value_len,
                 depth=depth)


# ----------------------------------------------------------------------------
# Variable tracking (multi-hop)
# ----------------------------------------------------------------------------


def vt(seed, index, *, seq_len, vocab_size, num_chains=2, num_hops=4, depth=None):
    """Chains ``ASSIGN x1 c; ASSIGN x2 x1; ...``; ``QUERY c`` -> ``x1 .. xh`` (chain 0)."""
    task = "vt"
    _check(task, vocab_size, num_chains=num_chains, num_hops=num_hops)
    n_ids = num_chains * (num_hops + 1)
    if n_ids > vocab_size - WORD0:
        raise ValueError(f"vt: {vocab_size=} too small for {num_chains=} x ({num_hops=} + 1) "
                         f"distinct ids")
    rng = _rng(task, seed, index)
    d = draw_depth(task, rng, depth)
    ids = _words(rng, vocab_size, n_ids, distinct=True).reshape(num_chains, num_hops + 1)
    needles, ranks, chain_of = [], [], []
    for c in range(num_chains):
        for h in range(num_hops):
            needles.append(np.asarray([ASSIGN, ids[c, h + 1], ids[c, h]]))
            ranks.append(h)
            chain_of.append(c)
    H = seq_len - 2 - num_hops
    F = H - 3 * len(needles)
    if F < 0:
        raise ValueError(f"vt: {seq_len=} too short for {num_chains=} x {num_hops=}: needs at "
                         f"least {seq_len - F}")
    # Each chain's statements in chain order: sorted offsets; chain 0's first at depth.
    offsets = np.empty(len(needles), np.int64)
    first = int(round(d * F))
    for c in range(num_chains):
        lo = first if c == 0 else 0
        o = np.sort(rng.integers(lo, F + 1, size=num_hops))
        if c == 0:
            o[0] = first
        offsets[c * num_hops:(c + 1) * num_hops] = o
    filler = _words(rng, vocab_size, F)
    parts, prev = [], 0
    for i in np.lexsort((ranks, offsets)):
        parts.append(filler[prev:offsets[i]])
        prev = offsets[i]
        parts.append(needles[i])
    parts.append(filler[prev:])
    hay = np.concatenate(parts)
    return finish_example(task, seq_len,
                          [(hay, False), ([QUERY, ids[0, 0]], False), (ids[0, 1:], True)],
                          _needle_depth(F, d))


# ----------------------------------------------------------------------------
# Aggregation: common and frequent words
# ----------------------------------------------------------------------------


def cwe(seed, index, *, seq_len, vocab_size, num_common=4, depth=None):
    """``num_common`` words occur ``2r`` times, the others ``<= r``; ``COMMON`` -> them.

    ``depth`` is accepted (one signature for the suite) and ignored.
    """
    task = "cwe"
    _check(task, vocab_size, num_common=num_common)
    k = int(num_common)
    H = seq_len - 1 - k
    P = vocab_size - WORD0 - k  # the rare words
    if P < 1 or H < 2 * k + 1:
        raise ValueError(f"cwe: {seq_len=} / {vocab_size=} too small for {num_common=}: needs "
                         f"seq_len >= {3 * k + 2} and vocab_size >= {WORD0 + k + 1}")
    rng = _rng(task, seed, index)
    r = -(-H // (P + 2 * k))  # ceil: k * 2r + P * r >= H
    words = _words(rng, vocab_size, k + P, distinct=True)
    common, rare = words[:k], words[k:]
    rest = H - 2 * r * k
    counts = np.full(P, rest // P)
    counts[rng.choice(P, size=rest % P, replace=False)] += 1  # each <= r, summing to rest
    bag = np.concatenate([np.repeat(common, 2 * r), np.repeat(rare, counts)])
    hay = rng.permutation(bag)
    first = {w: i for i, w in reversed(list(enumerate(hay)))}
    answer = np.asarray(sorted(common, key=lambda w: first[w]))
    return finish_example(task, seq_len, [(hay, False), ([COMMON], False), (answer, True)],
                          -1.0)


def fwe(seed, index, *, seq_len, vocab_size, num_frequent=3, alpha=2.0, depth=None):
    """Zipf(``alpha``) word counts; ``FREQUENT`` -> the ``num_frequent`` most frequent.

    ``depth`` is accepted and ignored.
    """
    task = "fwe"
    _check(task, vocab_size, num_frequent=num_frequent)
    if not alpha > 0:
        raise ValueError(f"fwe: {alpha=} must be > 0")
    k = int(num_frequent)
    H = seq_len - 1 - k
    P = vocab_size - WORD0
    if P < k + 1:
        raise ValueError(f"fwe: {vocab_size=} too small for {num_frequent=}")
    rng = _rng(task, seed, index)
    p = np.arange(1, P + 1, dtype=np.float64) ** -float(alpha)
    counts = np.floor(max(H, 0) * p / p.sum()).astype(np.int64)
    if H < 1 or not np.all(np.diff(counts[:k + 1]) < 0):
        raise ValueError(f"fwe: {seq_len=} too short for {num_frequent=} with {alpha=}: the "
                         f"{k + 1} most frequent word counts {counts[:k + 1].tolist()} must "
                         f"strictly decrease")
    counts[0] += H - counts.sum()  # the remainder to the most frequent keeps the order strict
    words = _words(rng, vocab_size, P, distinct=True)  # words[i] has rank i
    hay = rng.permutation(np.repeat(words, counts))
    return finish_example(task, seq_len,
                          [(hay, False), ([FREQUENT], False), (words[:k], True)], -1.0)


# ----------------------------------------------------------------------------
# Registry and the mixture
# ----------------------------------------------------------------------------

RULER_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt",
               "cwe", "fwe"]
DEPTH_TASKS = RULER_TASKS[:5]  # the tasks with a needle depth


def ruler(seed, index, *, seq_len, vocab_size, depth=None):
    """The suite as one training stream: example ``i`` is task ``RULER_TASKS[i % 7]``."""
    task = RULER_TASKS[int(index) % len(RULER_TASKS)]
    return TASKS[task](seed, index, seq_len=seq_len, vocab_size=vocab_size, depth=depth)


TASKS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
    "ruler": ruler,
}
