"""Passkey retrieval in real text: the test of Mohtashami & Jaggi 2023 that the YaRN paper
(Peng et al. 2023, section 4.3) reports, with a held-out token stream as the haystack.

    python -m longctx.evals --run-dir RUN --task passkey_text --lengths 512 1024 \\
        [--data HELD_OUT] [--tokenizer TOK]        # default: data.eval_path, UTF-8 bytes

The id-level ``passkey`` task (``longctx.data.synthetic``) stands marker ids for the
phrases, so only a model trained on it can answer; this one writes the phrases out and
hides them in text the model was *not* trained to retrieve from, so it measures what a
language model does zero-shot::

    [ held-out text ... NEEDLE ... held-out text ] QUESTION ANSWER
    NEEDLE   = "\\nThe pass key is {key}. Remember it. {key} is the pass key.\\n"
    QUESTION = "\\nWhat is the pass key? The pass key is"
    ANSWER   = " {key}"                                        (key: 5 random digits)

Each piece is encoded on its own (``encode``: ``str -> ids``; default UTF-8 bytes, one id
a byte) and the ids concatenated, so an example is exactly ``seq_len`` ids: the haystack
is the ``F`` held-out ids left over, read at a deterministic offset of the stream, and the
needle goes in at ``round(depth * F)``. The answer's ids are teacher forced and scored
(``longctx.evals.ruler.score_batch``): ``accuracy`` (answer ids that are the argmax),
``exact_match`` (every one), ``answer_logprob`` (mean log-probability per answer id).
"""

from __future__ import annotations

import numpy as np

from longctx.data.ruler import finish_example
from longctx.data.ruler_text import encode_bytes
from longctx.evals.ruler import score_batch

__all__ = ["NEEDLE", "QUESTION", "ANSWER", "template_len", "passkey_text", "passkey_text_eval"]

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


def _ids(encode, text, vocab_size):
    ids = np.asarray(encode(text), np.int64).reshape(-1)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"passkey_text: {text!r} encodes to ids {ids.tolist()[:8]}..., "
                         f"expected 1 or more ids in [0, {vocab_size=})")
    return ids


def template_len(encode=None, key: str = "00000") -> int:
    """Ids the needle, question and answer take (with ``key``): an example of ``seq_len``
    has ``seq_len - template_len`` ids of haystack."""
    encode = encode_bytes if encode is None else encode
    return sum(len(encode(t.format(key=key))) for t in (NEEDLE, QUESTION, ANSWER))


def passkey_text(haystack, seed: int, index: int, *, seq_len: int, vocab_size: int,
                 depth: float, encode=None) -> dict[str, np.ndarray]:
    """One example of exactly ``seq_len`` ids (module docstring): ``tokens``, ``targets``,
    ``loss_mask`` (int32 / int32 / float32 ``[seq_len]``), ``depth`` (the depth used,
    needle start / ``F``) and ``key`` (the passkey string).

    ``haystack``: the held-out stream, a 1-D array of ids; deterministic from
    ``(seed, index)`` (the key and the offset in the stream).
    """
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"passkey_text: {depth=} must be in [0, 1]")
    encode = encode_bytes if encode is None else encode
    rng = np.random.default_rng([int(seed), int(index), 2000])  # 2000: apart from other tasks
    key = "".join(str(d) for d in rng.integers(0, 10, size=5))
    needle = _ids(encode, NEEDLE.format(key=key), vocab_size)
    question = _ids(encode, QUESTION, vocab_size)
    answer = _ids(encode, ANSWER.format(key=key), vocab_size)
    F = seq_len - needle.size - question.size - answer.size
    if F < 0:
        raise ValueError(f"passkey_text: {seq_len=} too short: the needle, question and "
                         f"answer take {seq_len - F} ids with this tokenizer")
    n = len(haystack)
    if n < F:
        raise ValueError(f"passkey_text: {seq_len=} needs {F} haystack ids, the held-out "
                         f"stream has {n}")
    start = int(rng.integers(0, n - F + 1))
    hay = np.asarray(haystack[start:start + F], np.int64)
    at = int(round(float(depth) * F))
    out = finish_example("passkey_text", seq_len,
                  [(hay[:at], False), (needle, False), (hay[at:], False), (question, False),
                   (answer, True)], at / F if F else 0.0)
    out["key"] = key
    return out


def passkey_text_eval(model, haystack, *, lengths, depths, examples: int, vocab_size: int,
                      seed: int = 0, encode=None, batch_size: int = 8):
    """Rows ``{task: "passkey_text", length, depth, accuracy, exact_match, answer_logprob}``;
    the same ``examples`` keys and offsets at every depth (``index`` 0..examples-1)."""
    if examples < 1:
        raise ValueError(f"passkey_text: {examples=} must be >= 1")
    rows = []
    for L in lengths:
        for d in depths:
            tot = {"correct": 0, "scored": 0, "exact": 0, "logprob": 0.0}
            for b0 in range(0, examples, batch_size):
                ex = [passkey_text(haystack, seed, i, seq_len=int(L), vocab_size=vocab_size,
                                   depth=d, encode=encode)
                      for i in range(b0, min(b0 + batch_size, examples))]
                s = score_batch(model, {k: np.stack([e[k] for e in ex])
                                        for k in ("tokens", "targets", "loss_mask")})
                for k in tot:
                    tot[k] += s[k].sum()
            rows.append({"task": "passkey_text", "length": int(L), "depth": float(d),
                         "accuracy": float(tot["correct"] / tot["scored"]),
                         "exact_match": float(tot["exact"] / examples),
                         "answer_logprob": float(tot["logprob"] / tot["scored"])})
    return rows
