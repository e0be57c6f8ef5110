"""Inheritance (longctx.inherit): endpoints, exact interpolation, the cross-backend table,
the layer choice for growth and shrinking, dense -> MoE, and the errors."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.inherit.core import correspondence, inherited_layers, layer_source, upcycle
from longctx.model import layout

TINY = "experiments/configs/tiny.yaml"
SMALL = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_dim=64",
         "model.n_layers=2", "model.vocab_size=64", "data.seq_len=32"]


def _cfg(*over):
    return longctx.load_config(TINY, SMALL + list(over)).model


def _flat(model) -> dict:
    """Parameter name -> numpy array, per layer (``blocks/{i}/...``) in either layout: the
    view of ``longctx.model.layout``, itself checked by tests/test_scan_layers.py."""
    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}/")
            else:
                yield f"{prefix}{k}", np.asarray(v)
    return dict(walk(layout.params_of(model), ""))


@pytest.fixture(scope="module")
def parent():
    # A parent whose norms are not all ones, so that a copied norm is told from a fresh one.
    m = longctx.build_model(_cfg(), rngs=nnx.Rngs(0))
    for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        if p[-1] == "scale":
            v[...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(len(p)), v[...].shape)
    return m


_logits = nnx.jit(lambda m, t: m(t)[0])


@pytest.mark.slow
def test_endpoints_and_exact_interpolation(parent):
    cfg = parent.cfg
    tok = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    same = longctx.inherit(parent, cfg, ratio=1.0, rngs=nnx.Rngs(7))
    np.testing.assert_array_equal(_logits(same, tok), _logits(parent, tok))
    fresh = _flat(longctx.build_model(cfg, rngs=nnx.Rngs(7)))
    zero = _flat(longctx.inherit(parent, cfg, ratio=0, rngs=nnx.Rngs(7)))
    assert zero.keys() == fresh.keys()
    for k in fresh:
        np.testing.assert_array_equal(zero[k], fresh[k], err_msg=k)
    par = _flat(parent)
    for r in (0.5, 0.2):
        got = _flat(longctx.inherit(parent, cfg, ratio=r, rngs=nnx.Rngs(7)))
        for k in fresh:  # same architecture: every parameter is mapped
            want = np.float32(r) * par[k] + np.float32(1 - r) * fresh[k]
            np.testing.assert_array_equal(got[k], want, err_msg=k)


@pytest.mark.slow
def test_full_to_linear_hybrid_recurrent_table(parent):
    par = _flat(parent)
    total = sum(v.size for v in par.values())
    hedgehog = ["model.attention.backend=linear", "model.attention.linear.feature_map=hedgehog"]
    for over in (hedgehog, ["model.attention.pattern=[linear, full]"],
                 ["model.attention.backend=recurrent", "model.segment_len=16",
                  "model.attention.recurrent.compressive=linear"]):
        cfg = _cfg(*over)
        child = _flat(longctx.inherit(parent, cfg, ratio=1.0, rngs=nnx.Rngs(3)))
        fresh = _flat(longctx.build_model(cfg, rngs=nnx.Rngs(3)))
        def reached(k, v):  # copied as is, or each kv head repeated for 2 query heads
            c = child.get(k)
            return c is not None and (np.array_equal(c, v) or (
                c.shape != v.shape and np.array_equal(c, np.repeat(v, 2, axis=-2))))

        frac = sum(v.size for k, v in par.items() if reached(k, v)) / total
        assert frac >= 0.9, (over, frac)
        for k in child:
            mixer = k.split("/")[2:3] == ["mixer"]
            name = k.split("/")[-1]
            if name in ("hedgehog_q", "hedgehog_k"):  # Hedgehog: the map starts at identity
                np.testing.assert_array_equal(child[k], np.broadcast_to(np.eye(8), (4, 8, 8)))
            elif k not in par and name not in ("w_a", "conv_q", "conv_k", "conv_v"):
                np.testing.assert_array_equal(child[k], fresh[k], err_msg=k)  # extras fresh
            elif (mixer and name in ("wk", "wv", "conv_k", "conv_v")
                  and child[k].shape != par[k].shape):
                # GQA parent (2 kv heads) -> 4 heads: kv head h // 2 serves head h
                np.testing.assert_array_equal(child[k], np.take(par[k], [0, 0, 1, 1], axis=-2),
                                              err_msg=k)
            elif name == "w_a":  # Liger: the decay's input is the mean-pooled key
                wk = par[k.replace("w_a", "wk")][:, [0, 0, 1, 1]]
                np.testing.assert_allclose(child[k], wk.mean(-1), rtol=1e-5, atol=1e-9, err_msg=k)
            elif k in par:
                np.testing.assert_array_equal(child[k], par[k], err_msg=k)
    rec = [m for m in correspondence(parent, _cfg(*hedgehog), ratio=0.5) if m.rule != "copy"]
    assert {m.rule for m in rec} == {"repeat_kv", "liger", "hedgehog"}
    assert {m.child for m in rec if m.rule == "hedgehog"} == {
        f"blocks/{i}/mixer/hedgehog_{n}" for i in (0, 1) for n in "qk"}
    assert {m.child for m in rec if m.rule == "liger"} == {"blocks/0/mixer/w_a",
                                                            "blocks/1/mixer/w_a"}


def test_layers_growth_and_shrink(parent):
    assert inherited_layers(0.5, 4) == [0, 3] and inherited_layers(0.2, 10) == [0, 9]
    assert inherited_layers(0.5, 5) == [0, 2, 4]  # round half up: 2.5 -> 3 layers
    assert inherited_layers(1.0, 3) == [0, 1, 2] and inherited_layers(0.1, 4) == []
    assert [layer_source(i, 4, 2) for i in range(4)] == [0, 0, 1, 1]
    par = _flat(parent)
    grow = _cfg("model.n_layers=4")
    child = _flat(longctx.inherit(parent, grow, ratio=0.5, method="layers", rngs=nnx.Rngs(2)))
    fresh = _flat(longctx.build_model(grow, rngs=nnx.Rngs(2)))
    for k, v in child.items():
        parts = k.split("/")
        if parts[0] != "blocks":
            np.testing.assert_array_equal(v, par[k], err_msg=k)
            continue
        src = {"0": "0", "3": "1"}.get(parts[1])  # child 0 <- parent 0, child 3 <- parent 1
        want = fresh[k] if src is None else par["/".join(["blocks", src] + parts[2:])]
        np.testing.assert_array_equal(v, want, err_msg=k)
    deep = longctx.build_model(_cfg("model.n_layers=4"), rngs=nnx.Rngs(5))
    dp = _flat(deep)
    child = _flat(longctx.inherit(deep, _cfg(), ratio=1.0, method="layers", rngs=nnx.Rngs(2)))
    for k, v in child.items():
        parts = k.split("/")
        if parts[0] == "blocks":  # child 0 <- parent 0, child 1 <- parent 3
            k = "/".join(["blocks", {"0": "0", "1": "3"}[parts[1]]] + parts[2:])
        np.testing.assert_array_equal(v, dp[k])
    zero = _flat(longctx.inherit(parent, grow, ratio=0.0, method="layers", rngs=nnx.Rngs(2)))
    for k in fresh:
        np.testing.assert_array_equal(zero[k], fresh[k], err_msg=k)


@pytest.mark.slow
def test_dense_to_moe_same_function_and_split(parent):
    moe = _cfg("model.moe.num_experts=4", "model.moe.num_experts_per_tok=2",
               "model.moe.norm_topk_prob=true")
    child = longctx.inherit(parent, moe, ratio=1.0, rngs=nnx.Rngs(4))
    tok = jax.random.randint(jax.random.key(2), (2, 16), 0, moe.vocab_size)
    np.testing.assert_allclose(_logits(child, tok), _logits(parent, tok), atol=1e-5)
    split = _cfg("model.moe.num_experts=4", "model.moe.expert_dim=32")
    with pytest.raises(ValueError, match=r"blocks/0/mlp/w_(gate|up|down).*split=True"):
        longctx.inherit(parent, split, ratio=1.0, rngs=nnx.Rngs(4))
    got = _flat(upcycle(parent, split, rngs=nnx.Rngs(4), split=True))
    par = _flat(parent)
    for e in range(4):
        s = slice((e % 2) * 32, (e % 2 + 1) * 32)  # expert e = half e mod 2 of the dense MLP
        np.testing.assert_array_equal(got["blocks/1/mlp/w_up"][e], par["blocks/1/mlp/w_up"][:, s])
        np.testing.assert_array_equal(got["blocks/1/mlp/w_down"][e],
                                      par["blocks/1/mlp/w_down"][s])


@pytest.mark.slow
def test_errors_name_the_values(parent):
    cfg = parent.cfg
    with pytest.raises(ValueError, match=r"ratio=1.5 must be a number in \[0, 1\]"):
        longctx.inherit(parent, cfg, ratio=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="method='distill'; expected one of"):
        longctx.inherit(parent, cfg, ratio=0.5, method="distill", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="parent's vocab_size=64 differs from the child's "
                                         "vocab_size=128"):
        longctx.inherit(parent, _cfg("model.vocab_size=128"), ratio=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"embed/embedding has shape \(64, 32\) in the parent "
                                         r"and \(64, 48\)"):
        longctx.inherit(parent, _cfg("model.d_model=48", "model.head_dim=8"), ratio=0.5,
                        rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="except for `moe`"):
        upcycle(parent, dataclasses.replace(cfg, n_layers=3), rngs=nnx.Rngs(0))
