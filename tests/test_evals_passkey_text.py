"""Passkey retrieval in held-out text (longctx/evals/passkey_text.py): the example's layout,
read back as text, and the CLI's scores against the model's own log-probabilities."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.evals.__main__ import main as evals_main
from longctx.evals.passkey_text import (ANSWER, NEEDLE, QUESTION, passkey_text,
                                        passkey_text_eval, template_len)
from longctx.inherit.__main__ import write_run

HAY = np.frombuffer(b"".join(f"def f{i}(x):\n    return x + {i}\n".encode() for i in range(400)),
                    np.uint8).astype(np.int64)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_example_is_the_text_with_the_needle_at_its_depth(depth):
    T = 300
    ex = passkey_text(HAY, 0, 7, seq_len=T, vocab_size=256, depth=depth)
    key = ex["key"]
    assert len(key) == 5 and key.isdigit()
    text = bytes(ex["tokens"].astype(np.uint8)).decode()
    needle, tail = NEEDLE.format(key=key), QUESTION + ANSWER.format(key=key)
    F = T - len(needle) - len(tail)
    assert len(text) == T and text.endswith(tail) and F == T - template_len(key=key)
    at = text.index(needle)
    assert at == round(depth * F) and float(ex["depth"]) == pytest.approx(at / F)
    hay = text[:at] + text[at + len(needle):-len(tail)]  # a contiguous piece of the stream
    assert hay in bytes(HAY.astype(np.uint8)).decode()
    # teacher forced: exactly the answer " KEY" is scored, each id predicted from the one before
    scored = np.flatnonzero(ex["loss_mask"])
    assert scored.tolist() == list(range(T - len(key) - 2, T - 1))
    assert bytes(ex["targets"][scored].astype(np.uint8)).decode() == " " + key
    again = passkey_text(HAY, 0, 7, seq_len=T, vocab_size=256, depth=depth)
    np.testing.assert_array_equal(again["tokens"], ex["tokens"])  # deterministic
    other = passkey_text(HAY, 0, 8, seq_len=T, vocab_size=256, depth=depth)
    assert other["key"] != key or not np.array_equal(other["tokens"], ex["tokens"])


def test_example_refusals():
    with pytest.raises(ValueError, match=r"seq_len=64 too short: the needle, question and "
                                         r"answer take 104 ids"):
        passkey_text(HAY, 0, 0, seq_len=64, vocab_size=256, depth=0.5)
    with pytest.raises(ValueError, match=r"depth=1.5 must be in \[0, 1\]"):
        passkey_text(HAY, 0, 0, seq_len=300, vocab_size=256, depth=1.5)
    with pytest.raises(ValueError, match=r"needs 196 haystack ids, the held-out stream has 10"):
        passkey_text(HAY[:10], 0, 0, seq_len=300, vocab_size=256, depth=0.5)
    with pytest.raises(ValueError, match=r"expected 1 or more ids in \[0, vocab_size=64\)"):
        passkey_text(HAY, 0, 0, seq_len=300, vocab_size=64, depth=0.5)


def test_cli_scores_are_the_models_own_answer_probabilities(tmp_path):
    held = tmp_path / "held.bin"
    HAY.astype(np.uint16).tofile(held)
    cfg = longctx.load_config("experiments/configs/tiny.yaml", [
        "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_dim=64",
        "model.n_layers=1", "model.init_std=0.3", f"data.eval_path={held}"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(3))
    write_run(model, cfg, str(tmp_path / "run"), ratio=1.0, method="interpolate")
    rows = evals_main(["--run-dir", str(tmp_path / "run"), "--task", "passkey_text",
                       "--lengths", "160", "--depths", "0", "1", "--examples", "3"])
    assert [(r["length"], r["depth"]) for r in rows] == [(160, 0.0), (160, 1.0)]
    saved = [json.loads(l) for l in open(tmp_path / "run" / "eval_passkey_text.jsonl")]
    assert [r["accuracy"] for r in saved] == [r["accuracy"] for r in rows]
    for r in rows:  # the reference: the model's log-softmax at the scored positions, by hand
        ex = [passkey_text(HAY, cfg.data.eval_seed, i, seq_len=160, vocab_size=256,
                           depth=r["depth"]) for i in range(3)]
        logits = np.asarray(model(np.stack([e["tokens"] for e in ex]))[0], np.float64)
        logp = np.asarray(jax.nn.log_softmax(logits, -1))
        lp, hit, exact = [], [], []
        for e, l, lg in zip(ex, logp, logits):
            s = np.flatnonzero(e["loss_mask"])
            lp += l[s, e["targets"][s]].tolist()
            h = lg[s].argmax(-1) == e["targets"][s]
            hit += h.tolist()
            exact.append(h.all())
        assert r["answer_logprob"] == pytest.approx(np.mean(lp), abs=1e-4)
        assert r["accuracy"] == pytest.approx(np.mean(hit))
        assert r["exact_match"] == pytest.approx(np.mean(exact))
    direct = passkey_text_eval(model, HAY, lengths=[160], depths=[0.0], examples=3,
                               vocab_size=256, seed=cfg.data.eval_seed)
    assert direct[0]["answer_logprob"] == pytest.approx(rows[0]["answer_logprob"], abs=1e-5)
