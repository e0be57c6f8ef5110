"""RULER-style tasks (longctx/data/ruler.py): well-posed, causal, exact depths, deterministic.

The answers are checked by naive solvers written here, reading only the tokens
before each scored position.
"""

from collections import Counter

import numpy as np
import pytest

from longctx.config import ConfigError, load_config
from longctx.data import ruler, synthetic
from longctx.data.ruler import ASSIGN, COMMON, FREQUENT, NEEDLE, QUERY

V = 64
QUESTIONS = (QUERY, COMMON, FREQUENT)
KW = {"niah_single": {}, "niah_multikey": dict(num_needles=3), "niah_multivalue": dict(num_values=3),
      "niah_multiquery": dict(num_needles=4, num_queries=3), "vt": dict(num_chains=3, num_hops=3),
      "cwe": dict(num_common=3), "fwe": dict(num_frequent=3)}
VALUE_LEN = {"niah_single": 4, "niah_multikey": 4, "niah_multivalue": 2, "niah_multiquery": 2}


def _answer(task, hay, question):
    """The answer (list of ids) to ``question`` (tokens from the marker on) over ``hay``."""
    if task.startswith("niah"):
        n = VALUE_LEN[task]
        found = [(hay[i + 1], list(hay[i + 2:i + 2 + n])) for i in np.flatnonzero(hay == NEEDLE)]
        return [t for k, v in found if k == question[1] for t in v]
    if task == "vt":
        names, out = {question[1]}, []
        for i in np.flatnonzero(hay == ASSIGN):  # statements in order of appearance
            if hay[i + 2] in names:
                names.add(hay[i + 1])
                out.append(hay[i + 1])
        return out
    counts = Counter(hay.tolist())
    k = KW[task]["num_common" if task == "cwe" else "num_frequent"]
    ranked = sorted(counts, key=lambda w: -counts[w])
    assert counts[ranked[k - 1]] > counts[ranked[k]], "ambiguous: tie at the k-th word"
    top = ranked[:k]
    if task == "cwe":
        return sorted(top, key=lambda w: hay.tolist().index(w))
    return top


def _next_answer_token(task, prefix):
    """What follows ``prefix`` (which ends inside an answer), from the prefix alone."""
    q = [i for i, t in enumerate(prefix) if t in QUESTIONS]
    hay = prefix[:q[0]]
    last = q[-1]
    qlen = 2 if prefix[last] == QUERY else 1
    ans = _answer(task, hay, prefix[last:last + qlen])
    return ans[len(prefix) - (last + qlen)]


@pytest.mark.parametrize("task", ruler.RULER_TASKS)
@pytest.mark.parametrize("T", [48, 301])
def test_answer_is_recoverable_causally_and_only_the_answer_is_scored(task, T):
    for index in range(6):
        ex = ruler.TASKS[task](0, index, seq_len=T, vocab_size=V, **KW[task])
        tok, tgt, mask = ex["tokens"], ex["targets"], ex["loss_mask"]
        assert tok.shape == tgt.shape == mask.shape == (T,) and tok.dtype == np.int32
        assert tok.min() >= 1 and tok.max() < V  # no PAD, inside the vocabulary
        scored = np.flatnonzero(mask)
        assert scored.size and mask[-1] == 0 and set(np.unique(mask)) <= {0.0, 1.0}
        q0 = min(i for i, t in enumerate(tok) if t in QUESTIONS)
        assert scored.min() >= q0  # nothing before the question is scored
        assert not set(tok[:q0].tolist()) & {QUERY, COMMON, FREQUENT}
        np.testing.assert_array_equal(tgt[scored], tok[scored + 1])  # teacher forced
        assert (tgt[mask == 0] == 0).all()
        for t in scored:  # the solver sees tokens[:t + 1] only
            assert _next_answer_token(task, tok[:t + 1]) == tgt[t], (task, index, t)
        # every answer token of the tail is scored: the tail after the question is
        # question markers/keys (given) and answers (scored)
        n_answer = len(_answer(task, tok[:q0], tok[q0:q0 + (2 if tok[q0] == QUERY else 1)]))
        if task != "niah_multiquery":
            assert scored.size == n_answer and scored[-1] == T - 2


@pytest.mark.parametrize("task", ruler.DEPTH_TASKS)
def test_the_needle_sits_at_the_requested_depth(task):
    T = 200
    for d in (0.0, 0.3, 1.0):
        for index in range(3):
            ex = ruler.TASKS[task](2, index, seq_len=T, vocab_size=V, depth=d, **KW[task])
            tok = ex["tokens"]
            q0 = min(i for i, t in enumerate(tok) if t in QUESTIONS)
            hay = tok[:q0]
            marker, width = (ASSIGN, 3) if task == "vt" else (NEEDLE, 2 + VALUE_LEN[task])
            starts = np.flatnonzero(hay == marker)
            if task == "vt":  # the queried chain's first statement assigns the constant
                pinned = next(s for s in starts if hay[s + 2] == tok[q0 + 1])
            else:  # the queried key's first needle
                pinned = next(s for s in starts if hay[s + 1] == tok[q0 + 1])
            F = len(hay) - width * len(starts)
            filler_before = pinned - width * int((starts < pinned).sum())
            assert filler_before == round(d * F), (task, d, index)
            assert ex["depth"] == pytest.approx(round(d * F) / F)
    ex = ruler.TASKS[task](2, 0, seq_len=T, vocab_size=V, depth=(0.2, 0.4), **KW[task])
    assert 0.2 - 1e-2 <= ex["depth"] <= 0.4 + 1e-2


def test_deterministic_from_seed_and_index_and_registered_for_training():
    for task in ruler.TASKS:
        a = synthetic.make_batch(task, seed=3, start_index=5, batch_size=3, seq_len=96,
                                 vocab_size=V)
        b = synthetic.make_batch(task, seed=3, start_index=5, batch_size=3, seq_len=96,
                                 vocab_size=V)
        c = synthetic.make_batch(task, seed=4, start_index=5, batch_size=3, seq_len=96,
                                 vocab_size=V)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a["tokens"], c["tokens"])
        assert a["tokens"].shape == (3, 96)
    # the mixture cycles through the suite by index
    for i, task in enumerate(ruler.RULER_TASKS):
        np.testing.assert_array_equal(ruler.ruler(0, i, seq_len=80, vocab_size=V)["tokens"],
                                      ruler.TASKS[task](0, i, seq_len=80, vocab_size=V)["tokens"])
    cfg = load_config("experiments/configs/tiny.yaml",
                      ["data.task=niah_multikey", "data.passkey_depth_min=0.5",
                       "data.passkey_depth_max=0.5"])
    from longctx.train.loop import make_source

    ex = make_source(cfg)[0]
    assert ex["tokens"].shape == (cfg.data.seq_len,) and float(ex["depth"]) == pytest.approx(
        0.5, abs=0.03)


def test_bad_arguments_are_errors_naming_the_value():
    with pytest.raises(ValueError, match="depth"):
        ruler.niah_single(0, 0, seq_len=64, vocab_size=V, depth=1.5)
    with pytest.raises(ValueError, match="num_queries"):
        ruler.niah_multiquery(0, 0, seq_len=64, vocab_size=V, num_needles=2, num_queries=3)
    with pytest.raises(ValueError, match="too short"):
        ruler.niah_multikey(0, 0, seq_len=20, vocab_size=V, num_needles=4)
    with pytest.raises(ValueError, match="too short"):
        ruler.vt(0, 0, seq_len=20, vocab_size=V)
    with pytest.raises(ValueError, match="too short"):
        ruler.fwe(0, 0, seq_len=8, vocab_size=V)
    with pytest.raises(ValueError, match="vocab_size"):
        ruler.cwe(0, 0, seq_len=64, vocab_size=16)
    with pytest.raises(ValueError, match="seed"):
        ruler.vt(-1, 0, seq_len=64, vocab_size=V)
    with pytest.raises(ConfigError, match="data"):
        load_config("experiments/configs/tiny.yaml", ["data.task=vt", "data.seq_len=12"])
