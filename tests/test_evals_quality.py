"""Quality evals: perplexity by position against a naive per-position loss, the RULER eval
against a naive argmax count, and both through ``python -m longctx.evals``."""

import json

import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.config import load_config
from longctx.data import ruler
from longctx.evals import __main__ as cli
from longctx.evals import perplexity as P
from longctx.evals.ruler import ruler_eval
from longctx.train import train

SMALL = ["model.d_model=32", "model.mlp_dim=32", "model.n_layers=1", "model.n_heads=2",
         "model.n_kv_heads=2", "model.vocab_size=64"]


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("experiments/configs/tiny.yaml", SMALL + ["data.seq_len=16"])
    return cfg, longctx.build_model(cfg.model, rngs=nnx.Rngs(0))


def _naive_nll(model, window):
    """Per-position cross entropy of one window [L + 1], one example at a time, in numpy."""
    logits = np.asarray(model(window[None, :-1].astype(np.int32))[0][0], np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(len(window) - 1), window[1:]]


def test_perplexity_by_position_matches_a_naive_per_position_loss(tiny, tmp_path):
    cfg, model = tiny
    stream = np.random.default_rng(0).integers(0, 64, 500).astype(np.uint16)
    path = tmp_path / "held_out.bin"
    stream.tofile(path)
    L, n = 24, 5
    starts = np.linspace(0, len(stream) - L - 1, n).astype(int)
    naive = np.mean([_naive_nll(model, stream[s:s + L + 1].astype(np.int64)) for s in starts], 0)
    curve = P.position_loss(model, P.load_tokens(str(path)), length=L, examples=n,
                            vocab_size=64, batch_size=2)
    np.testing.assert_allclose(curve, naive, rtol=1e-5, atol=1e-5)

    assert P.buckets(24) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 24)]
    assert P.buckets(24, split=12) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 12), (12, 16),
                                       (16, 24)]
    rows = P.perplexity_eval(model, cfg, lengths=[L], examples=n, path=str(path))
    assert [(r["pos_lo"], r["pos_hi"]) for r in rows] == P.buckets(24)  # trained 16: an edge
    for r in rows:
        assert r["loss"] == pytest.approx(naive[r["pos_lo"]:r["pos_hi"]].mean(), rel=1e-5)
        assert r["ppl"] == pytest.approx(np.exp(r["loss"]))
        assert r["beyond_trained"] == (r["pos_lo"] >= 16)

    # a prepared directory: meta.json and its shards, read in name order as one stream
    d = tmp_path / "prepared"
    d.mkdir()
    stream[:200].tofile(d / "shard_000.bin")
    stream[200:].tofile(d / "shard_001.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 64, "eos_id": 0}))
    np.testing.assert_array_equal(P.load_tokens(str(d), vocab_size=64), stream)
    with pytest.raises(ValueError, match="vocab_size=64 exceeds"):
        P.load_tokens(str(d), vocab_size=32)
    with pytest.raises(ValueError, match="needs 601 held-out tokens"):
        P.position_loss(model, stream, length=600, examples=1, vocab_size=64)
    with pytest.raises(ValueError, match="token id"):
        P.position_loss(model, stream, length=8, examples=2, vocab_size=10)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        P.load_tokens(str(tmp_path))


def test_ruler_eval_counts_what_a_naive_argmax_counts(tiny):
    cfg, model = tiny
    rows = ruler_eval(model, cfg, lengths=[40], depths=[0.5], examples=3,
                      tasks=["niah_multikey", "fwe"], batch_size=2)
    cells = {r["subtask"]: r for r in rows}
    assert set(cells) == {"niah_multikey", "fwe", "score"}
    for task in ("niah_multikey", "fwe"):
        correct = scored = exact = 0
        logp = 0.0
        for i in range(3):
            ex = ruler.TASKS[task](cfg.data.eval_seed, i, seq_len=40, vocab_size=64,
                                   depth=0.5 if task != "fwe" else None)
            m = ex["loss_mask"] > 0
            logits = np.asarray(model(ex["tokens"][None])[0][0], np.float64)
            hit = (logits.argmax(-1) == ex["targets"]) & m
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            logp += (logits[np.arange(40), ex["targets"]] - lse)[m].sum()
            correct, scored, exact = correct + hit.sum(), scored + m.sum(), exact + (
                hit.sum() == m.sum())
        r = cells[task]
        assert r["accuracy"] == pytest.approx(correct / scored)
        assert r["exact_match"] == pytest.approx(exact / 3)
        assert r["answer_logprob"] == pytest.approx(logp / scored, rel=1e-4)
    assert cells["niah_multikey"]["depth"] == 0.5 and cells["fwe"]["depth"] is None
    assert cells["score"]["exact_match"] == pytest.approx(
        (cells["niah_multikey"]["exact_match"] + cells["fwe"]["exact_match"]) / 2)
    with pytest.raises(ValueError, match="unknown tasks"):
        ruler_eval(model, cfg, lengths=[40], tasks=["niah"])


@pytest.mark.slow
def test_cli_ruler_and_perplexity_on_a_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    held = tmp_path / "held.bin"
    np.random.default_rng(1).integers(0, 64, 300).astype(np.uint16).tofile(held)
    train(load_config("experiments/configs/tiny.yaml", SMALL + [
        f"train.run_dir={run_dir}", "train.steps=2", "train.batch_size=8", "train.eval_every=0",
        "train.tensorboard=false", "checkpoint.async_save=false", "data.task=ruler",
        "data.seq_len=48"]), progress=False)
    rows = cli.main(["--run-dir", str(run_dir), "--task", "ruler", "--lengths", "48", "96",
                     "--depths", "0", "1", "--examples", "2", "--ruler-tasks", "niah_single",
                     "cwe"])
    assert [(r["subtask"], r["length"], r["depth"]) for r in rows] == [
        ("niah_single", 48, 0.0), ("niah_single", 48, 1.0), ("cwe", 48, None),
        ("niah_single", 96, 0.0), ("niah_single", 96, 1.0), ("cwe", 96, None),
        ("score", 48, None), ("score", 96, None)]
    for r in rows:
        assert 0 <= r["exact_match"] <= r["accuracy"] + 1e-9 <= 1 + 1e-9
        assert r["answer_logprob"] <= 0 and r["step"] == 2 and r["trained_seq_len"] == 48
    assert "summary score" in capsys.readouterr().out
    ppl = cli.main(["--run-dir", str(run_dir), "--task", "perplexity", "--lengths", "64",
                    "--examples", "2", "--data", str(held)])
    assert [(r["pos_lo"], r["pos_hi"]) for r in ppl][-2:] == [(32, 48), (48, 64)]
    assert ppl[-1]["beyond_trained"] and not ppl[0]["beyond_trained"]
    saved = [json.loads(l) for l in open(run_dir / "eval_perplexity.jsonl")]
    assert len(saved) == len(ppl)
    with pytest.raises(ValueError, match="data.eval_path"):
        cli.main(["--run-dir", str(run_dir), "--task", "perplexity", "--lengths", "64"])
