"""Tokenised data preparation (python -m longctx.data.prepare) with a tokenizer trained here.

Round trip (decode of each EOS-delimited span = the input document), determinism over
workers and work units, refusal of bad input without a meta.json, and the trainer
learning from a prepared directory.
"""

import json
import os

import numpy as np
import pytest

from longctx.config import load_config
from longctx.data.pipeline import build_source
from longctx.data.prepare import main as prepare_main
from longctx.data.prepare import prepare
from longctx.data.sources import PreparedTokenSource
from longctx.generate import main as generate_main
from longctx.train import train

TINY = "experiments/configs/tiny.yaml"
WORDS = ("the cat sat on a mat while the dog ran after a red ball in the warm sun "
         "and every bird sang").split()


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 30))) + ("!" if i % 3 else "")
            for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE (GPT-2 style, exact round trip) trained on a few strings; an HF
    model directory with tokenizer.json and a tokenizer_config.json naming the EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_docs(50, 1) + ["ünïcødé €uro ✓\nnew line"], trainer)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return d, tok


def _spans(out):
    meta = json.loads((out / "meta.json").read_text())
    ids = np.concatenate([np.fromfile(out / s["file"], meta["dtype"]) for s in meta["shards"]])
    ends = np.flatnonzero(ids == meta["eos_id"])
    assert ends[-1] == len(ids) - 1  # every document ends with EOS
    return meta, np.split(ids, ends[:-1] + 1)


@pytest.mark.slow
def test_round_trip_jsonl_and_text_files(tokenizer_dir, tmp_path):
    tdir, tok = tokenizer_dir
    docs = _docs(40) + ["ünïcødé €uro ✓\nnew line", "  leading spaces\tand tabs  "]
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps({"body": d}) for d in docs[:30]) + "\n\n")
    txt = tmp_path / "b.txt"  # blank-line separated documents (a run of blank lines too)
    txt.write_text("\n\n".join(docs[30:36]) + "\n \n\n" + "\n\n".join(docs[36:]) + "\n")
    out = tmp_path / "out"
    meta = prepare(tdir, [jl, txt], out, text_field="body", split_blank_lines=True,
                   progress=False, shard_tokens=200)
    meta2, spans = _spans(out)
    assert meta == meta2 and len(meta["shards"]) > 1
    assert [tok.decode(s[:-1].tolist(), skip_special_tokens=False) for s in spans] == docs
    assert meta["num_documents"] == len(docs) and meta["eos_id"] == tok.token_to_id("<eos>")
    assert meta["num_tokens"] == sum(len(s) for s in spans)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.get_vocab_size()
    assert len(meta["tokenizer"]["sha256"]) == 64 and len(meta["inputs"]) == 2
    for s in meta["shards"]:  # no document straddles two shards
        assert np.fromfile(out / s["file"], meta["dtype"])[-1] == meta["eos_id"]
    # The trainer's reader sees the same documents, in order.
    src = PreparedTokenSource(out, vocab_size=512)
    assert [src[i].tolist() for i in range(len(src))] == [s.tolist() for s in spans]
    with pytest.raises(ValueError, match="vocab_size=256 is smaller.*vocab_size=3"):
        build_source("tokens", seq_len=16, vocab_size=256, path=str(out))

    # Deterministic: 2 spawned workers and tiny work units give the same bytes.
    out2 = tmp_path / "out2"
    prepare(tdir / "tokenizer.json", [jl, txt], out2, eos="<eos>", text_field="body",
            split_blank_lines=True, progress=False, shard_tokens=200, workers=2, chunk_bytes=64)
    for s in meta["shards"]:
        assert (out / s["file"]).read_bytes() == (out2 / s["file"]).read_bytes()
    assert json.loads((out2 / "meta.json").read_text())["shards"] == meta["shards"]


def test_bad_input_stops_without_meta(tokenizer_dir, tmp_path, capsys):
    tdir, _ = tokenizer_dir
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"text": "the cat"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    cases = [
        ([good, tmp_path / "missing.txt"], {}, FileNotFoundError, "missing.txt"),
        ([good, bad], {}, ValueError, r"bad.jsonl:2"),
        ([good], {"eos": "<nope>"}, ValueError, "unknown EOS token '<nope>'"),
        ([good], {"text_field": "body"}, ValueError, r"g.jsonl:1.*'body'"),
    ]
    for i, (inputs, kw, err, msg) in enumerate(cases):
        out = tmp_path / f"o{i}"
        with pytest.raises(err, match=msg):
            prepare(tdir, inputs, out, progress=False, **kw)
        assert not out.exists() and not any(p.name.startswith(f"o{i}.tmp") for p in tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="tokenizer not found.*nowhere"):
        prepare(tmp_path / "nowhere", [good], tmp_path / "o9", progress=False)
    assert prepare_main(["--tokenizer", str(tdir), "--input", str(bad), "--out",
                         str(tmp_path / "o10"), "--workers", "1"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err and not (tmp_path / "o10").exists()
    # a directory without meta.json is not prepared
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        PreparedTokenSource(tmp_path / "half")


@pytest.mark.slow
def test_prepare_train_generate_learns(tokenizer_dir, tmp_path, capsys):
    """The three commands of docs/getting-started.md: prepare -> train (loss falls) -> generate."""
    tdir, tok = tokenizer_dir
    txt = tmp_path / "story.txt"
    txt.write_text("\n\n".join(_docs(200, 3)))
    out = tmp_path / "data"
    assert prepare_main(["--tokenizer", str(tdir), "--input", str(txt), "--out", str(out),
                         "--split-blank-lines", "--workers", "1"]) == 0
    cfg = load_config(TINY, [f"train.run_dir={tmp_path / 'run'}", "train.batch_size=8",
                             "train.log_every=1", "train.eval_every=0", "train.tensorboard=false",
                             "checkpoint.async_save=false", "optim.warmup_steps=2",
                             "optim.lr=2e-2", "model.vocab_size=320", "model.n_layers=1",
                             "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
                             "model.mlp_dim=64", "data.seq_len=32", "train.steps=12",
                             "data.source=tokens", f"data.path={out}"])
    train(cfg, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12, losses
    assert np.mean(losses[-3:]) < 0.75 * losses[0]  # ln(320) = 5.8 -> the word stats
    capsys.readouterr()
    assert generate_main(["--run-dir", str(tmp_path / "run"), "--tokenizer", str(tdir),
                          "--prompt", "the cat", "--max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the cat") and len(text) > len("the cat\n")
    new = tok.encode(text[len("the cat"):-1], add_special_tokens=False).ids
    assert 0 < len(new) <= 12 + 2  # (re-encoding may merge differently at the seam)
