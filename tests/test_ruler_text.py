"""RULER's text template (longctx/data/ruler_text.py): bytes and a real tokenizer.

The answer is found by a regular expression over the decoded text before the
question, never from the generator's own variables.
"""

import re

import numpy as np
import pytest

from longctx.config import load_config, task_kwargs
from longctx.data import ruler_text, sources, synthetic

NEEDLE_RE = re.compile(r"magic numbers for (\w+) is: (\d+)\.")
QUESTION_RE = re.compile(r"What is the special magic number for (\w+) mentioned")


def _check(ex, T, decode, depth):
    tokens, mask = ex["tokens"], ex["loss_mask"] > 0
    assert tokens.shape == (T,) and mask.any()
    first = np.flatnonzero(mask)[0] + 1  # the first answer token; nothing before it scored
    assert np.all(ex["targets"][mask] == tokens[np.flatnonzero(mask) + 1])
    assert np.flatnonzero(mask)[-1] == T - 2  # the answer runs to the end
    context = decode(tokens[:first])
    (key, value), = NEEDLE_RE.findall(context)  # exactly one needle, in the context
    assert QUESTION_RE.findall(context) == [key]  # the question asks for the needle's key
    assert context.index(value) < context.index("What is")  # the answer is in the haystack only
    assert decode(tokens[first:]).strip() == value
    # the needle sits at a sentence boundary within one sentence of the requested depth
    hay = context[context.index("\n") + 1:context.index("\nWhat is")]
    at = hay.index(" One of the special")
    rest = hay[:at] + hay[at:].split(".", 1)[1]
    assert abs(at / len(rest) - depth) <= 24 / len(rest)
    assert hay[:at] == "" or hay[:at].endswith(".")
    assert abs(float(ex["depth"]) - depth) <= 0.5 * 24 / len(rest) + 0.1


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_bytes_answer_recoverable_at_depth_and_deterministic(depth):
    for index in range(3):
        ex = ruler_text.niah_text(7, index, seq_len=400, vocab_size=256, depth=depth)
        _check(ex, 400, sources.decode_bytes, depth)
        again = synthetic.TASKS["niah_text"](7, index, seq_len=400, vocab_size=256, depth=depth)
        assert all(np.array_equal(ex[k], again[k]) for k in ex)
    a, b = (ruler_text.niah_text(7, i, seq_len=400, vocab_size=256) for i in (0, 1))
    assert not np.array_equal(a["tokens"], b["tokens"])


def test_through_a_bpe_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [ruler_text.HEAD, *ruler_text.NOISE, ruler_text.NEEDLE, ruler_text.QUESTION,
            " ".join(ruler_text.KEYS)] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    encode = ruler_text.tokenizer_encoder(str(tmp_path))
    V = tok.get_vocab_size()
    for index in range(3):
        ex = ruler_text.niah_text(0, index, seq_len=160, vocab_size=V, depth=0.5, encode=encode)
        _check(ex, 160, lambda ids: tok.decode(ids.tolist()), 0.5)
        assert ex["tokens"].max() < V
    with pytest.raises(ValueError, match="vocab_size=100"):
        ruler_text.niah_text(0, 0, seq_len=160, vocab_size=100, encode=encode)


def test_errors_and_config():
    with pytest.raises(ValueError, match="seq_len=100 too short"):
        ruler_text.niah_text(0, 0, seq_len=100, vocab_size=256)
    with pytest.raises(ValueError, match="vocab_size=64"):
        ruler_text.niah_text(0, 0, seq_len=400, vocab_size=64)
    cfg = load_config(None, ["data.task=niah_text", "model.vocab_size=256", "data.seq_len=512",
                             "data.passkey_depth_min=0.2", "data.passkey_depth_max=0.4"])
    assert task_kwargs(cfg) == {"depth": (0.2, 0.4)}
