"""Tests for longctx.data.sources and longctx.data.pipeline (all files in tmp_path, small)."""

import json

import numpy as np
import pytest

from longctx.data import synthetic
from longctx.data.pipeline import (
    SOURCES,
    PackedLMSource,
    build_source,
    iterator_state,
    make_dataset,
    restore_iterator,
)
from longctx.data.sources import (
    ByteTextSource,
    JsonlSource,
    SyntheticSource,
    TokenBinSource,
    decode_bytes,
    encode_bytes,
)

KEYS = ("tokens", "targets", "loss_mask", "segment_ids")


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def _random_docs(rng, n, max_len, vocab):
    # Lengths include 0 (empty), 1 (no target at all) and some longer than a row.
    lengths = rng.choice([0, 1, 2, 3, 5, 8, 13, 40], size=n)
    lengths[: min(3, n)] = [0, 1, max_len][: min(3, n)]
    return [rng.integers(0, vocab, size=int(m)) for m in lengths]


@pytest.fixture
def mqar():
    return SyntheticSource("mqar", seed=3, seq_len=32, vocab_size=64, num_kv_pairs=4)


@pytest.fixture
def packed(tmp_path):
    rng = np.random.default_rng(0)
    docs = _random_docs(rng, 60, 50, 1000)
    path = tmp_path / "train.bin"
    np.concatenate([np.append(d, 1000) for d in docs]).astype(np.uint16).tofile(path)
    return build_source("tokens", seq_len=16, vocab_size=1001, path=str(path), dtype="uint16",
                        eos_id=1000)


# --------------------------------------------------------------------------- #
# Packing against a naive re-implementation
# --------------------------------------------------------------------------- #


def naive_pack(docs, seq_len):
    """Concatenate, cut rows of seq_len; targets/segments by walking the stream token by token."""
    stream, owner = [], []
    for d, doc in enumerate(docs):
        for x in doc:
            stream.append(int(x))
            owner.append(d)
    rows = []
    for r in range(len(stream) // seq_len):
        row = {"tokens": [], "targets": [], "loss_mask": [], "segment_ids": []}
        seg = 0
        for t in range(seq_len):
            i = r * seq_len + t
            if t == 0 or owner[i] != owner[i - 1]:
                seg += 1
            has_next = i + 1 < len(stream) and owner[i + 1] == owner[i]
            row["tokens"].append(stream[i])
            row["targets"].append(stream[i + 1] if has_next else 0)
            row["loss_mask"].append(1.0 if has_next else 0.0)
            row["segment_ids"].append(seg)
        rows.append(row)
    return rows


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_packing_matches_naive(seq_len):
    docs = _random_docs(np.random.default_rng(seq_len), 40, 3 * seq_len + 5, 50)
    src = PackedLMSource(docs, seq_len=seq_len, vocab_size=50)
    want = naive_pack(docs, seq_len)
    assert len(src) == len(want) == sum(map(len, docs)) // seq_len
    for r in range(len(src)):
        got = src[r]
        assert got["tokens"].dtype == got["targets"].dtype == got["segment_ids"].dtype == np.int32
        assert got["loss_mask"].dtype == np.float32
        for k in KEYS:
            np.testing.assert_array_equal(got[k], np.asarray(want[r][k]), err_msg=f"row {r} {k}")


def test_packing_boundaries():
    docs = [np.arange(10, 15), np.arange(20, 23), np.arange(30, 40)]  # 5 + 3 + 10 tokens
    src = PackedLMSource(docs, seq_len=6, vocab_size=50)
    assert len(src) == 3
    r0, r1, r2 = src[0], src[1], src[2]
    # row 0: 10 11 12 13 14 | 20 ; the last target (21) comes from the next row
    np.testing.assert_array_equal(r0["tokens"], [10, 11, 12, 13, 14, 20])
    np.testing.assert_array_equal(r0["targets"], [11, 12, 13, 14, 0, 21])
    np.testing.assert_array_equal(r0["loss_mask"], [1, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 1, 1, 2])
    # row 1: 21 22 | 30 31 32 33 -- the continuation of doc 1 is segment 1
    np.testing.assert_array_equal(r1["segment_ids"], [1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(r1["loss_mask"], [1, 0, 1, 1, 1, 1])
    # row 2: the stream's last token has no target
    np.testing.assert_array_equal(r2["tokens"], np.arange(34, 40))
    np.testing.assert_array_equal(r2["loss_mask"], [1, 1, 1, 1, 1, 0])
    # segment ids change exactly where the document changes, on every row
    for r in range(len(src)):
        row = src[r]
        change = np.diff(row["segment_ids"]) != 0
        doc_end = row["loss_mask"][:-1] == 0  # here no doc has length 1, so mask 0 <=> doc end
        np.testing.assert_array_equal(change, doc_end)


def test_packing_keep_remainder():
    docs = [np.arange(1, 6), np.arange(6, 9)]  # 8 tokens, seq_len 3 -> 2 full rows + 2 left
    src = PackedLMSource(docs, seq_len=3, vocab_size=10, drop_remainder=False)
    assert len(src) == 3
    last = src[2]
    np.testing.assert_array_equal(last["tokens"], [7, 8, 0])
    np.testing.assert_array_equal(last["targets"], [8, 0, 0])
    np.testing.assert_array_equal(last["loss_mask"], [1, 0, 0])
    np.testing.assert_array_equal(last["segment_ids"], [1, 1, 0])
    assert len(PackedLMSource(docs, seq_len=3, vocab_size=10)) == 2


# --------------------------------------------------------------------------- #
# Determinism, resumption, process shards
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("shuffle", [True, False])
def test_deterministic(mqar, shuffle):
    a = _take(iter(make_dataset(mqar, global_batch_size=4, seed=7, shuffle=shuffle)), 3)
    b = _take(iter(make_dataset(mqar, global_batch_size=4, seed=7, shuffle=shuffle)), 3)
    _assert_batches_equal(a, b)
    assert a[0]["tokens"].shape == (4, 32) and a[0]["loss_mask"].dtype == np.float32
    if shuffle:
        c = next(iter(make_dataset(mqar, global_batch_size=4, seed=8)))
        assert not np.array_equal(a[0]["tokens"], c["tokens"])


def test_unshuffled_synthetic_matches_make_batch(mqar):
    it = iter(make_dataset(mqar, global_batch_size=4, shuffle=False))
    for step in range(2):
        want = synthetic.make_batch("mqar", seed=3, start_index=4 * step, batch_size=4, seq_len=32,
                                    vocab_size=64, num_kv_pairs=4)
        _assert_batches_equal([next(it)], [want])


def test_passkey_depth_batched():
    src = SyntheticSource("passkey", seed=0, seq_len=64, vocab_size=32)
    b = next(iter(make_dataset(src, global_batch_size=2)))
    assert b["depth"].shape == (2,) and b["tokens"].shape == (2, 64)


@pytest.mark.parametrize("which", ["synthetic", "packed"])
def test_resume_bitwise(which, mqar, packed):
    src = mqar if which == "synthetic" else packed
    ds = make_dataset(src, global_batch_size=4, seed=1)
    full = _take(iter(ds), 7)
    it = iter(ds)
    _take(it, 3)
    state = iterator_state(it)
    assert state["step"] == 3
    restored = restore_iterator(ds, json.dumps(state))  # survives a JSON round trip
    _assert_batches_equal(_take(restored, 4), full[3:])
    # grain's own protocol works too: a fresh iterator, set_state.
    it2 = iter(make_dataset(src, global_batch_size=4, seed=1))
    it2.set_state(it.get_state())
    _assert_batches_equal(_take(it2, 4), full[3:])


def test_resume_rejects_other_stream(mqar):
    it = iter(make_dataset(mqar, global_batch_size=4, seed=1))
    next(it)
    with pytest.raises(ValueError, match="seed"):
        restore_iterator(make_dataset(mqar, global_batch_size=4, seed=2), iterator_state(it))


@pytest.mark.parametrize("which", ["synthetic", "packed"])
def test_process_shards_union_is_global_batch(which, mqar, packed):
    src = mqar if which == "synthetic" else packed
    glob = _take(iter(make_dataset(src, global_batch_size=4, seed=5)), 5)
    shards = [_take(iter(make_dataset(src, global_batch_size=4, seed=5, process_index=p,
                                      process_count=2)), 5) for p in range(2)]
    for step in range(5):
        assert shards[0][step]["tokens"].shape[0] == 2
        union = {k: np.concatenate([shards[p][step][k] for p in range(2)]) for k in glob[step]}
        _assert_batches_equal([union], [glob[step]])


def test_state_restores_under_another_process_count(mqar):
    glob = _take(iter(make_dataset(mqar, global_batch_size=4, seed=5)), 4)
    it = iter(make_dataset(mqar, global_batch_size=4, seed=5))
    _take(it, 2)
    state = iterator_state(it)
    parts = [next(restore_iterator(make_dataset(mqar, global_batch_size=4, seed=5, process_index=p,
                                                process_count=4), state)) for p in range(4)]
    union = {k: np.concatenate([b[k] for b in parts]) for k in glob[2]}
    _assert_batches_equal([union], [glob[2]])


def test_finite_epochs_same_steps_per_process(packed):
    n = len(packed)
    steps = 2 * n // 6
    per_process = [list(make_dataset(packed, global_batch_size=6, process_index=p, process_count=3,
                                      num_epochs=2)) for p in range(3)]
    assert [len(b) for b in per_process] == [steps] * 3
    # together the processes read exactly `steps` whole global batches
    rows = np.concatenate([np.concatenate([b["tokens"] for b in per_process[p]]) for p in range(3)])
    assert rows.shape == (steps * 6, 16)


def test_make_dataset_errors(mqar):
    with pytest.raises(ValueError, match=r"global_batch_size=5.*process_count=2"):
        make_dataset(mqar, global_batch_size=5, process_count=2)
    with pytest.raises(ValueError, match="process_index=2"):
        make_dataset(mqar, global_batch_size=4, process_index=2, process_count=2)


# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #


def test_byte_tokenizer_round_trip():
    text = "plain ascii, ünïcödé, 中文, emoji 🎉\n\ttabs"
    ids = encode_bytes(text)
    assert ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert decode_bytes(ids) == text
    assert decode_bytes(ids.astype(np.int32)) == text


def test_byte_text_source(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first doc.\n\nsecond doc ü.\n\n\n\nthird", encoding="utf-8")
    b.write_text("", encoding="utf-8")
    per_file = ByteTextSource([a, b])
    assert len(per_file) == 2 and list(per_file.lengths) == [a.stat().st_size, 0]
    assert decode_bytes(per_file[0]) == a.read_text(encoding="utf-8")
    split = ByteTextSource([a, b], separator="\n\n")
    assert [decode_bytes(split[i]) for i in range(len(split))] == ["first doc.", "second doc ü.", "third"]
    assert decode_bytes(split.read(1, 7, 10)) == "doc"
    # packed end to end through the registry
    src = build_source("text", seq_len=4, vocab_size=256, paths=[str(a)], separator="\n\n")
    assert decode_bytes(src[0]["tokens"]) == "firs"


def test_jsonl_source(tmp_path):
    path = tmp_path / "d.jsonl"
    texts = ["hello world", "ünïcödé 🎉", "x"]
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n",
                    encoding="utf-8")
    src = JsonlSource(path)
    assert len(src) == 3
    assert [decode_bytes(src[i]) for i in range(3)] == texts
    other = tmp_path / "o.jsonl"
    other.write_text(json.dumps({"body": "abc"}) + "\n")
    assert decode_bytes(JsonlSource(other, text_field="body")[0]) == "abc"


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_bin_source(tmp_path, dtype):
    big = 70_000 if dtype == "uint32" else 60_000
    data = np.array([5, 6, 0, 7, 0, 0, big, 9], dtype=dtype)  # eos 0
    path = tmp_path / f"t.{dtype}.bin"
    data.tofile(path)
    whole = TokenBinSource(path, dtype=dtype)
    assert len(whole) == 1 and isinstance(whole._mmap(), np.memmap)
    np.testing.assert_array_equal(whole[0], data)
    assert whole[0].dtype == np.dtype(dtype)
    docs = TokenBinSource(path, dtype=dtype, eos_id=0)
    got = [docs[i].tolist() for i in range(len(docs))]
    assert got == [[5, 6, 0], [7, 0], [0], [big, 9]]  # EOS ends (and belongs to) its document
    packed = build_source("tokens", seq_len=4, vocab_size=big + 1, path=str(path), dtype=dtype, eos_id=0)
    r0, r1 = packed[0], packed[1]
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 2])
    np.testing.assert_array_equal(r0["targets"], [6, 0, 0, 0])  # 7 -> 0 is scored: next row
    np.testing.assert_array_equal(r0["loss_mask"], [1, 1, 0, 1])
    np.testing.assert_array_equal(r1["tokens"], [0, 0, big, 9])
    np.testing.assert_array_equal(r1["segment_ids"], [1, 2, 3, 3])
    assert docs.validate(big + 1) == 8


# --------------------------------------------------------------------------- #
# Clear errors
# --------------------------------------------------------------------------- #


def test_missing_files(tmp_path):
    missing = str(tmp_path / "nope")
    for make in (lambda: ByteTextSource([missing]), lambda: JsonlSource(missing),
                 lambda: TokenBinSource(missing)):
        with pytest.raises(FileNotFoundError, match="nope"):
            make()


def test_corrupt_bin(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")  # 3 bytes: a truncated uint16 file
    with pytest.raises(ValueError, match=r"corrupt token file .*odd\.bin.*3 bytes is not a multiple of 2"):
        TokenBinSource(path, dtype="uint16")
    with pytest.raises(ValueError, match=r"unknown dtype='int8'.*uint16"):
        TokenBinSource(path, dtype="int8")


def test_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        JsonlSource(path)
    path.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: no field 'text'"):
        JsonlSource(path)


def test_token_id_out_of_vocab(tmp_path):
    path = tmp_path / "big.bin"
    np.array([1, 2, 3, 70_000, 4, 5], dtype=np.uint32).tofile(path)
    src = build_source("tokens", seq_len=2, vocab_size=50_000, path=str(path), dtype="uint32")
    src[0]  # ids 1, 2 (and the target 3) are fine: the check is on access
    with pytest.raises(ValueError, match=r"token id 70000 .*vocab_size=50000.*big\.bin token 3"):
        next(iter(make_dataset(src, global_batch_size=3, shuffle=False)))
    with pytest.raises(ValueError, match=r"token id 70000 .*vocab_size=50000.*big\.bin token 3"):
        TokenBinSource(path, dtype="uint32").validate(50_000, chunk_tokens=2)
    # byte-level text with a vocab smaller than 256: the file and byte offset are named
    txt = tmp_path / "t.txt"
    txt.write_text("ab\u00ff")  # 'ÿ' is bytes c3 bf
    with pytest.raises(ValueError, match=r"token id 195 .*vocab_size=128.*t\.txt byte 2"):
        build_source("text", seq_len=4, vocab_size=128, paths=[str(txt)])[0]


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown kind='parquet'.*jsonl.*synthetic.*text.*tokens"):
        build_source("parquet", seq_len=8, vocab_size=10)
    assert set(SOURCES) == {"synthetic", "text", "jsonl", "tokens"}


def test_sources_pickle_after_use(packed, tmp_path):
    # grain's multiprocessing pickles the source into workers; open memmaps must not travel.
    import pickle

    txt = tmp_path / "p.txt"
    txt.write_text("pickled text")
    for src in (packed, build_source("text", seq_len=4, vocab_size=256, paths=[str(txt)])):
        before = src[1]
        again = pickle.loads(pickle.dumps(src))
        _assert_batches_equal([again[1]], [before])
