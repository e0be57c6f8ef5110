"""Tests for longctx.data.synthetic, checked against independent scans."""

import numpy as np
import pytest

from longctx.data import ruler, ruler_text
from longctx.data import synthetic as syn

# (seq_len, vocab_size, num_kv_pairs)
MQAR_CASES = [(64, 64, 4), (64, 20, 8), (128, 256, 16), (256, 8192, 32), (33, 32, 8)]
MQAR_IDS = [f"T{t}-n{n}" for t, _, n in MQAR_CASES]

DEFAULT_KW = {
    "mqar": dict(num_kv_pairs=4),
    "passkey": dict(passkey_len=5),
    "copy": dict(),
    "selective_copy": dict(num_tokens=8),
}


def _check_common(ex, seq_len, vocab_size):
    assert ex["tokens"].shape == ex["targets"].shape == ex["loss_mask"].shape == (seq_len,)
    assert ex["tokens"].dtype == np.int32
    assert ex["targets"].dtype == np.int32
    assert ex["loss_mask"].dtype == np.float32
    assert set(np.unique(ex["loss_mask"])) <= {0.0, 1.0}
    assert ex["tokens"].min() >= 0 and ex["tokens"].max() < vocab_size
    assert ex["targets"].min() >= 0 and ex["targets"].max() < vocab_size


# --------------------------------------------------------------------------- #
# Registry, determinism, ranges.


def test_registry_is_explicit():
    assert syn.TASKS == {
        "mqar": syn.mqar,
        "passkey": syn.passkey,
        "copy": syn.copy,
        "selective_copy": syn.selective_copy,
        **ruler.TASKS,
        "niah_text": ruler_text.niah_text,
    }


@pytest.mark.parametrize("task", sorted(DEFAULT_KW))
def test_determinism(task):
    fn = syn.TASKS[task]
    kw = dict(seq_len=64, vocab_size=64, **DEFAULT_KW[task])
    a = fn(3, 7, **kw)
    b = fn(3, 7, **kw)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # A different index or a different seed gives a different example.
    assert not np.array_equal(a["tokens"], fn(3, 8, **kw)["tokens"])
    assert not np.array_equal(a["tokens"], fn(4, 7, **kw)["tokens"])


def test_no_global_random_state():
    np.random.seed(0)
    a = syn.mqar(1, 2, seq_len=64, vocab_size=64, num_kv_pairs=4)
    np.random.seed(12345)
    state = np.random.get_state()[1].copy()
    b = syn.mqar(1, 2, seq_len=64, vocab_size=64, num_kv_pairs=4)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # untouched


@pytest.mark.parametrize("task", sorted(DEFAULT_KW))
@pytest.mark.parametrize("seq_len,vocab_size", [(64, 16), (100, 50), (257, 1000)], ids=["T64-V16", "T100-V50", "T257-V1000"])
def test_shapes_dtypes_and_token_range(task, seq_len, vocab_size):
    for index in range(20):
        ex = syn.TASKS[task](0, index, seq_len=seq_len, vocab_size=vocab_size, **DEFAULT_KW[task])
        _check_common(ex, seq_len, vocab_size)


@pytest.mark.parametrize("task", sorted(DEFAULT_KW))
def test_make_batch_stacks_examples(task):
    kw = DEFAULT_KW[task]
    batch = syn.make_batch(task, seed=5, start_index=10, batch_size=4, seq_len=64, vocab_size=64, **kw)
    assert batch["tokens"].shape == (4, 64) and batch["tokens"].dtype == np.int32
    assert batch["targets"].shape == (4, 64) and batch["targets"].dtype == np.int32
    assert batch["loss_mask"].shape == (4, 64) and batch["loss_mask"].dtype == np.float32
    assert batch["tokens"].max() < 64 and batch["targets"].max() < 64
    for i in range(4):
        ex = syn.TASKS[task](5, 10 + i, seq_len=64, vocab_size=64, **kw)
        for key in ex:
            np.testing.assert_array_equal(batch[key][i], ex[key])
    if task == "passkey":
        assert batch["depth"].shape == (4,) and batch["depth"].dtype == np.float32
    else:
        assert "depth" not in batch


def test_make_batch_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task='nope'.*copy.*mqar.*passkey.*selective_copy"):
        syn.make_batch("nope", seed=0, start_index=0, batch_size=2, seq_len=64, vocab_size=64)


# --------------------------------------------------------------------------- #
# MQAR.


def _scan_mqar(tokens, targets, mask, num_kv_pairs, vocab_size):
    """Independent check of one MQAR example by scanning the sequence."""
    n = num_kv_pairs
    half = vocab_size // 2
    prefix = tokens[: 2 * n]
    keys, values = prefix[0::2], prefix[1::2]
    assert len(set(keys.tolist())) == n, "keys must be distinct"
    assert np.all((keys >= 1) & (keys < half))
    assert np.all((values >= half) & (values < vocab_size))
    assert not mask[: 2 * n].any(), "no loss inside the key-value prefix"

    masked = np.flatnonzero(mask)
    assert len(masked) == n
    queried = []
    for t in masked:
        assert (t - 2 * n) % 2 == 0, "queries sit at even offsets of the query region"
        # Find where tokens[t] appears as a key (even position) in the prefix.
        hits = [j for j in range(0, 2 * n, 2) if tokens[j] == tokens[t]]
        assert len(hits) == 1
        assert targets[t] == tokens[hits[0] + 1]
        queried.append(int(tokens[t]))
    assert sorted(queried) == sorted(keys.tolist()), "every key queried exactly once"

    key_set = set(keys.tolist())
    for t in range(2 * n, len(tokens)):
        if not mask[t]:
            assert tokens[t] not in key_set, f"filler at {t} collides with a key"
            assert targets[t] == 0
        assert tokens[t] != 0
    assert 0 not in tokens


@pytest.mark.parametrize("seq_len,vocab_size,num_kv_pairs", MQAR_CASES, ids=MQAR_IDS)
def test_mqar_independent_scan(seq_len, vocab_size, num_kv_pairs):
    for index in range(30):
        ex = syn.mqar(11, index, seq_len=seq_len, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs)
        _check_common(ex, seq_len, vocab_size)
        _scan_mqar(ex["tokens"], ex["targets"], ex["loss_mask"], num_kv_pairs, vocab_size)


def test_mqar_filler_covers_all_non_keys():
    # The filler sampler should reach every id of [1, V) except the keys.
    V, n = 20, 6
    for index in range(5):
        ex = syn.mqar(0, index, seq_len=2048, vocab_size=V, num_kv_pairs=n)
        keys = set(ex["tokens"][: 2 * n : 2].tolist())
        filler = ex["tokens"][2 * n :][ex["loss_mask"][2 * n :] == 0]
        assert set(filler.tolist()) == set(range(1, V)) - keys


def _slot_histogram(power_a, seq_len=128, n=4, examples=300):
    space = (seq_len - 2 * n) // 2
    counts = np.zeros(space, dtype=np.int64)
    for index in range(examples):
        ex = syn.mqar(0, index, seq_len=seq_len, vocab_size=64, num_kv_pairs=n, power_a=power_a)
        slots = (np.flatnonzero(ex["loss_mask"]) - 2 * n) // 2
        counts[slots] += 1
    return counts


def test_mqar_power_law_prefers_short_gaps():
    counts = _slot_histogram(0.01)
    q = len(counts) // 4
    # Under p(j) ~ j**-0.99 the first quarter of the region is far likelier.
    assert counts[:q].sum() > 3 * counts[-q:].sum()
    assert counts[:q].sum() > counts[q : 2 * q].sum() > 0
    # And power_a=1 is uniform: the quarters are roughly balanced.
    flat = _slot_histogram(1.0)
    assert 0.6 < flat[:q].sum() / flat[-q:].sum() < 1.6


@pytest.mark.parametrize(
    "seq_len,vocab_size,num_kv_pairs,match",
    [
        (15, 64, 4, r"seq_len=15 too short for num_kv_pairs=4: needs at least 16"),
        (64, 8, 4, r"vocab_size=8 too small for num_kv_pairs=4"),
        (64, 64, 0, r"num_kv_pairs=0"),
    ],
    ids=["T15-n4", "V8-n4", "T64-n0"],
)
def test_mqar_errors(seq_len, vocab_size, num_kv_pairs, match):
    with pytest.raises(ValueError, match=match):
        syn.mqar(0, 0, seq_len=seq_len, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs)


def test_mqar_minimal_sizes_ok():
    ex = syn.mqar(0, 0, seq_len=16, vocab_size=10, num_kv_pairs=4)  # keys [1,5) all used
    _scan_mqar(ex["tokens"], ex["targets"], ex["loss_mask"], 4, 10)


# --------------------------------------------------------------------------- #
# Passkey.


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, None], ids=["d0", "d0.5", "d1", "drandom"])
@pytest.mark.parametrize("seq_len,passkey_len", [(64, 5), (101, 3), (12, 5)], ids=["T64-n5", "T101-n3", "T12-n5"])
def test_passkey_layout(seq_len, passkey_len, depth):
    V, n = 32, passkey_len
    for index in range(5):
        ex = syn.passkey(2, index, seq_len=seq_len, vocab_size=V, passkey_len=n, depth=depth)
        _check_common(ex, seq_len, V)
        tok = ex["tokens"]
        assert ex["depth"].shape == () and ex["depth"].dtype == np.float32
        marks = np.flatnonzero(tok == syn.PASSKEY_MARK)
        queries = np.flatnonzero(tok == syn.PASSKEY_QUERY)
        assert len(marks) == 1 and len(queries) == 1
        m, q = int(marks[0]), int(queries[0])
        assert q == seq_len - n - 1
        last_start = q - (n + 1)  # needle ends right before QUERY
        if depth is not None:
            assert m == round(depth * last_start)
        assert 0 <= m <= last_start
        if last_start > 0:
            assert ex["depth"] == pytest.approx(m / last_start, abs=1e-6)
        if depth == 0.0:
            assert m == 0
        if depth == 1.0:
            assert m + n + 1 == q
        digits = tok[m + 1 : m + 1 + n]
        assert np.all((digits >= 3) & (digits <= 12))
        np.testing.assert_array_equal(tok[q + 1 :], digits)
        # Scored positions: QUERY and the final d1..d_{n-1}, predicting d1..dn.
        np.testing.assert_array_equal(np.flatnonzero(ex["loss_mask"]), np.arange(q, q + n))
        np.testing.assert_array_equal(ex["targets"][q : q + n], digits)
        # Everything outside the needle and the query is filler.
        filler = np.ones(seq_len, bool)
        filler[m : m + n + 1] = False
        filler[q:] = False
        assert np.all(tok[filler] >= 13)


def test_passkey_random_depth_spreads():
    depths = syn.make_batch("passkey", seed=0, start_index=0, batch_size=200, seq_len=128, vocab_size=32)["depth"]
    assert depths.min() < 0.1 and depths.max() > 0.9
    assert np.all((depths >= 0) & (depths <= 1))


def test_passkey_depth_range_stays_in_range():
    depths = syn.make_batch("passkey", seed=0, start_index=0, batch_size=200, seq_len=128,
                            vocab_size=32, depth=(0.25, 0.5))["depth"]
    assert depths.min() >= 0.24 and depths.max() <= 0.51 and depths.max() - depths.min() > 0.2


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(seq_len=64, vocab_size=32, depth=(0.6, 0.2)), r"depth=\(0.6, 0.2\)"),
        (dict(seq_len=11, vocab_size=32, passkey_len=5), r"seq_len=11 too short for passkey_len=5: needs at least 12"),
        (dict(seq_len=64, vocab_size=15), r"vocab_size=15 too small: needs at least 16"),
        (dict(seq_len=64, vocab_size=32, depth=1.5), r"depth=1.5"),
        (dict(seq_len=64, vocab_size=32, passkey_len=0), r"passkey_len=0"),
    ],
    ids=["depth-range", "T11-n5", "V15", "depth1.5", "n0"],
)
def test_passkey_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        syn.passkey(0, 0, **kw)


# --------------------------------------------------------------------------- #
# Copy and selective copy.


@pytest.mark.parametrize("seq_len,copy_len", [(64, None), (64, 10), (9, 4), (10, None)], ids=["T64-ndef", "T64-n10", "T9-n4", "T10-ndef"])
def test_copy(seq_len, copy_len):
    V = 50
    n = (seq_len - 1) // 2 if copy_len is None else copy_len
    for index in range(10):
        ex = syn.copy(1, index, seq_len=seq_len, vocab_size=V, copy_len=copy_len)
        _check_common(ex, seq_len, V)
        tok = ex["tokens"]
        x = tok[:n]
        assert np.all(x >= 2)
        assert tok[n] == syn.COPY_SEP
        np.testing.assert_array_equal(tok[n + 1 : 2 * n + 1], x)
        assert np.all(tok[2 * n + 1 :] == 0)
        scored = np.flatnonzero(ex["loss_mask"])
        np.testing.assert_array_equal(scored, np.arange(n, 2 * n))
        np.testing.assert_array_equal(ex["targets"][scored], x)
        # Next-token aligned: each scored target is the following input token.
        np.testing.assert_array_equal(ex["targets"][scored], tok[scored + 1])


@pytest.mark.parametrize("seq_len,num_tokens", [(64, 16), (33, 16), (200, 4)], ids=["T64-n16", "T33-n16", "T200-n4"])
def test_selective_copy(seq_len, num_tokens):
    V, k = 20, num_tokens
    L = seq_len - k - 1
    for index in range(10):
        ex = syn.selective_copy(4, index, seq_len=seq_len, vocab_size=V, num_tokens=k)
        _check_common(ex, seq_len, V)
        tok = ex["tokens"]
        # Independent scan: non-blank tokens of the input part, in order.
        data = tok[:L][tok[:L] != syn.SELECTIVE_COPY_BLANK]
        assert len(data) == k and np.all(data >= 2)
        assert tok[L] == syn.SELECTIVE_COPY_SEP
        np.testing.assert_array_equal(tok[L + 1 :], data)
        scored = np.flatnonzero(ex["loss_mask"])
        np.testing.assert_array_equal(scored, np.arange(L, L + k))
        np.testing.assert_array_equal(ex["targets"][scored], data)
        np.testing.assert_array_equal(ex["targets"][scored], tok[scored + 1])


def test_selective_copy_positions_vary():
    firsts = {int(np.flatnonzero(syn.selective_copy(0, i, seq_len=128, vocab_size=20, num_tokens=4)["tokens"][:123])[0]) for i in range(20)}
    assert len(firsts) > 5


@pytest.mark.parametrize(
    "fn,kw,match",
    [
        (syn.copy, dict(seq_len=20, vocab_size=10, copy_len=10), r"copy: seq_len=20 too short for copy_len=10: needs at least 21"),
        (syn.copy, dict(seq_len=2, vocab_size=10), r"copy_len=None must be >= 1"),
        (syn.copy, dict(seq_len=20, vocab_size=2), r"vocab_size=2 too small: needs at least 3"),
        (syn.selective_copy, dict(seq_len=32, vocab_size=10, num_tokens=16), r"seq_len=32 too short for num_tokens=16: needs at least 33"),
        (syn.selective_copy, dict(seq_len=64, vocab_size=2), r"vocab_size=2 too small"),
    ],
    ids=["copy-T20-n10", "copy-T2", "copy-V2", "selcopy-T32-n16", "selcopy-V2"],
)
def test_copy_errors(fn, kw, match):
    with pytest.raises(ValueError, match=match):
        fn(0, 0, **kw)


def test_negative_seed_or_index_rejected():
    with pytest.raises(ValueError, match=r"index=-1"):
        syn.copy(0, -1, seq_len=16, vocab_size=10)
