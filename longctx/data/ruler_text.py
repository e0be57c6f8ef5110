"""RULER's needle-in-a-haystack as text, through a tokenizer (the template mode).

The id-level suite (``longctx/data/ruler.py``) stands markers for RULER's phrases;
this module writes the phrases out, as RULER does (Hsieh et al. 2024, the
``niah`` task with the "noise" haystack), and tokenizes them::

    Some special magic numbers are hidden within the following text. Make sure to
    memorize it. I will quiz you about the numbers afterwards.
     The grass is green. The sky is blue. ... One of the special magic numbers for
     {key} is: {value}. ... There and back again.
    What is the special magic number for {key} mentioned in the provided text? The
    special magic number for {key} mentioned in the provided text is {value}

``key`` is a word of ``KEYS`` (none occurs in the haystack), ``value`` a 7-digit
number; the answer is `` {value}`` and only its tokens are scored (teacher forced,
``targets[t] = tokens[t + 1]``, as the id-level tasks).

Tokenizer: ``encode`` is any ``str -> sequence of ids`` (default: UTF-8 bytes, the byte tokenizer of
``longctx.data.sources``, so ``vocab_size >= 256``);
`tokenizer_encoder` makes one from a ``tokenizer.json`` / Hugging Face directory
(the ``tokenizers`` library, as ``longctx.data.prepare``). Each piece (head,
every haystack sentence, the needle, the question, the answer) is encoded on its
own and the ids concatenated, so the sequence is exactly ``seq_len`` ids: the
haystack is the sentence stream cut to the ``F`` ids left over. The needle goes
in at the sentence boundary nearest ``depth * F`` (RULER inserts at sentence
boundaries); ``depth`` in the example is the depth actually used (needle start
within the haystack / ``F``).

Registered as ``data.task=niah_text`` (byte ids) in ``longctx.data.synthetic.TASKS``;
deterministic from ``(seed, index)`` like every task.
"""

from __future__ import annotations

import numpy as np

from longctx.data.ruler import draw_depth, finish_example

__all__ = ["HEAD", "NOISE", "NEEDLE", "QUESTION", "KEYS", "niah_text", "tokenizer_encoder"]

HEAD = ("Some special magic numbers are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the numbers afterwards.\n")
NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again."]
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is")
ANSWER = " {value}"
KEYS = ["apple", "river", "violin", "marble", "falcon", "lantern", "orchid", "copper",
        "harbor", "meadow", "pepper", "saddle", "thunder", "velvet", "walnut", "zebra",
        "anchor", "basket", "candle", "dragon", "ember", "feather", "glacier", "hammer",
        "island", "jigsaw", "kettle", "lemon", "mirror", "needle", "oyster", "pillow"]


def tokenizer_encoder(path: str):
    """``str -> list[int]`` of the tokenizer at ``path`` (no special tokens added)."""
    from longctx.data.prepare import load_tokenizer  # the tokenizers library, only when asked

    tok, _ = load_tokenizer(path)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def encode_bytes(text: str) -> np.ndarray:
    """UTF-8 bytes, one id each (``longctx.data.sources.encode_bytes``, which imports this
    package's task registry: written here to keep the dependency one way)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)


def _ids(encode, text, vocab_size):
    ids = np.asarray(encode(text), np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError(f"niah_text: the tokenizer encodes {text!r} to no ids")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"niah_text: the tokenizer gives id {int(ids.max())} (or "
                         f"{int(ids.min())}) for {text!r}, outside the model's "
                         f"vocab_size={vocab_size}")
    return ids


def niah_text(seed, index, *, seq_len, vocab_size, depth=None, encode=None):
    """One RULER text needle-in-a-haystack example of exactly ``seq_len`` ids (module doc)."""
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"niah_text: {seed=} and {index=} must be non-negative")
    encode = encode_bytes if encode is None else encode
    rng = np.random.default_rng([int(seed), int(index), 1000])  # 1000: apart from ruler.py's
    d = draw_depth("niah_text", rng, depth)
    key = KEYS[int(rng.integers(len(KEYS)))]
    value = str(int(rng.integers(1_000_000, 10_000_000)))
    head = _ids(encode, HEAD, vocab_size)
    needle = _ids(encode, NEEDLE.format(key=key, value=value), vocab_size)
    question = _ids(encode, QUESTION.format(key=key), vocab_size)
    answer = _ids(encode, ANSWER.format(value=value), vocab_size)
    F = seq_len - head.size - needle.size - question.size - answer.size
    if F < 0:
        raise ValueError(f"niah_text: {seq_len=} too short: the template takes "
                         f"{seq_len - F} ids with this tokenizer")
    sents = [_ids(encode, " " + s, vocab_size) for s in NOISE]
    reps = -(-F // sum(s.size for s in sents)) + 1
    stream = np.concatenate(sents * reps)[:F]
    bounds = np.cumsum([0] + [s.size for s in sents] * reps)
    bounds = bounds[bounds <= F]  # sentence starts inside the haystack (and F itself)
    at = int(bounds[np.argmin(np.abs(bounds - d * F))])
    hay = np.concatenate([stream[:at], needle, stream[at:]])
    return finish_example("niah_text", seq_len,
                          [(head, False), (hay, False), (question, False), (answer, True)],
                          at / F if F else 0.0)
