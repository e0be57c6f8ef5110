"""experiments.extend_context: the quick mode end to end (base run, zero-shot, a child run
written by longctx.inherit and fine-tuned by the trainer, outputs), the passkey mixing, and
the table rebuilt from results.jsonl."""

import json
import math
import os
import re

import numpy as np
import pytest

from experiments import extend_context as ec
from longctx.config import load_config
from longctx.evals.core import load_model
from longctx.evals.passkey_text import ANSWER, NEEDLE, QUESTION
from longctx.evals.perplexity import load_tokens, position_loss


def test_scaling_overrides_are_valid_configs_and_refuse_unknown_methods():
    for m in ec.METHODS:
        s = load_config(None, [ec.scaling(m, 4, 128)]).model.rope_scaling
        assert s.type == m and (m == "none" or s.factor == 4.0)
    with pytest.raises(ValueError, match=r"unknown method 'pi'; expected one of \('none'"):
        ec.scaling("pi", 4, 128)


def test_mix_passkeys_puts_whole_pairs_inside_rows():
    text = np.random.default_rng(0).integers(ord("a"), ord("z") + 1, 50_000)  # no phrase in it
    mixed = ec.mix_passkeys(text, row_len=128, share=0.3, seed=1)
    assert len(mixed) % 128 == 0
    rows = [bytes(r.astype(np.uint8)).decode() for r in mixed.reshape(-1, 128)]
    with_pair = [r for r in rows if "pass key" in r]
    assert 0.2 < len(with_pair) / len(rows) < 0.4
    for r in with_pair:  # needle, then the question answered with the needle's key
        key = r[r.index("The pass key is ") + 16:][:5]
        assert NEEDLE.format(key=key) in r and (QUESTION + ANSWER.format(key=key)) in r
        assert r.index(NEEDLE.format(key=key)) < r.index(QUESTION)
    stripped = "".join(rows)
    for phrase in set(re.findall(r"\nThe pass key is \d{5}\. Remember it\. \d{5} is the pass "
                                 r"key\.\n|\nWhat is the pass key\? The pass key is \d{5}",
                                 stripped)):
        stripped = stripped.replace(phrase, "")
    # without the phrases: the text itself, in order, from its start
    assert stripped == bytes(text[:len(stripped)].astype(np.uint8)).decode()
    with pytest.raises(ValueError, match=r"row_len=64 cannot hold the passkey phrases"):
        ec.mix_passkeys(text, row_len=64, share=0.3)


@pytest.mark.slow
def test_quick_mode_runs_end_to_end(tmp_path):
    out = str(tmp_path / "ext")
    rows = ec.main(["--quick", "--methods", "dynamic", "--out", out])
    l0, s = 128, 2.0
    assert {(r["phase"], r["length"]) for r in rows} == {
        (ph, L) for ph in ec.PHASES for L in (l0, 256, 512)}
    pre, ft = 4 * 16 * l0, 2 * 2048  # quick: 4 base steps of 16 x l0, 2 fine-tune of 8 x 256
    for r in rows:
        assert (r["method"], r["factor"], r["seed"]) == ("dynamic", s, 0)
        assert (r["pretrain_tokens"], r["ft_tokens"]) == (pre, ft)
        assert r["ft_fraction"] == pytest.approx(ft / pre)
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2))
        assert (r["passkey"] is None) == (r["length"] > s * l0)
        assert len(r["curve"]) and r["curve"][-1][1] == r["length"]
    # dynamic NTK at l0 is the base model: the zero-shot row equals an evaluation of the base
    # run without any override, made here through the public evaluation path
    base = os.path.join(out, "runs", "seed0", "base")
    cfg, model, step = load_model(base)
    assert step == 4 and cfg.model.rope_scaling.type == "none"
    held = load_tokens(os.path.join(out, "corpus", "heldout.bin"), vocab_size=256)
    ref = position_loss(model, held, length=l0, examples=2, vocab_size=256)
    zs = next(r for r in rows if r["phase"] == "zero_shot" and r["length"] == l0)
    assert zs["loss"] == pytest.approx(ref.mean(), rel=1e-6)
    # the fine-tuned model: a child of the base by longctx.inherit, trained 2 steps at s l0
    child = os.path.join(out, "runs", "seed0", "dynamic-s2")
    info = json.load(open(os.path.join(child, "inheritance.json")))
    assert (info["parent"], info["ratio"], info["mapped"].keys()) == (base, 1.0, {"copy"})
    ccfg, _, cstep = load_model(child)
    assert cstep == 2 and ccfg.data.seq_len == 256
    assert (ccfg.model.rope_scaling.type, ccfg.model.rope_scaling.factor,
            ccfg.model.rope_scaling.original_max_position_embeddings) == ("dynamic", 2.0, l0)
    # outputs complete, nothing half-written left
    names = set(os.listdir(out))
    assert {"results.jsonl", "results.md", "extend_context.png"} <= names
    assert not [n for n in names if "partial" in n or n.endswith(".tmp")]
    with open(os.path.join(out, "extend_context.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [json.loads(l) for l in open(os.path.join(out, "results.jsonl"))] == rows


def _row(method, phase, seed, length, loss, passkey):
    return {"method": method, "factor": 4.0, "phase": phase, "seed": seed, "length": length,
            "loss": loss, "bpb": loss / math.log(2), "loss_head": loss, "loss_tail": loss,
            "curve": [[0, 1, loss], [1, length, loss]], "passkey": passkey, "l0": 8,
            "passkey_logprob": -passkey,
            "pretrain_tokens": 1000, "ft_tokens": 10, "ft_fraction": 0.01}


def test_table_from_results_is_the_mean_and_std_over_seeds(tmp_path):
    rows = [_row(m, ph, seed, L, 1.0 + seed + (m == "yarn") + L / 100, 0.5 * seed)
            for m in ("none", "yarn") for ph in ec.PHASES for seed in (0, 1)
            for L in (8, 32, 64)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ec.main(["--from-results", str(src), "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "results.md").read_text()

    def cell(m, L):
        v = np.array([1.0 + seed + (m == "yarn") + L / 100 for seed in (0, 1)]) / math.log(2)
        return f"{v.mean():.3f} ± {v.std():.3f}"
    line = (f"| yarn | finetuned | {cell('yarn', 8)} | {cell('yarn', 32)} | {cell('yarn', 64)} "
            f"| {cell('yarn', 64)} | 0.25 ± 0.25 | 0.25 ± 0.25 | -0.25 ± 0.25 |")
    assert line in table.splitlines()
    assert "ft / pretraining = 0.010" in table
    assert (tmp_path / "out" / "extend_context.png").stat().st_size > 0
