"""The `linear` backend inside the model: causality, decoding = forward, segments = one pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.config import ConfigError
from longctx.model import layout

TINY = "experiments/configs/tiny.yaml"

# One config per variant; together they cover the options: normalisation with its
# carried normaliser, conv on/off, several chunks with a padded last one (T=50,
# chunk 16), a key dim != value dim, a chunk longer than a segment.
VARIANTS = {
    "linear": ["model.attention.linear.normalize=true", "model.attention.linear.chunk_size=16"],
    "retnet": ["model.attention.linear.conv_size=0", "model.attention.linear.chunk_size=16"],
    "gla": ["model.attention.linear.chunk_size=32"],
    "deltanet": ["model.attention.linear.chunk_size=16", "model.attention.linear.key_dim=16"],
    "gated_deltanet": ["model.attention.linear.chunk_size=16"],
    "kda": ["model.attention.linear.chunk_size=32"],  # two per-key sub-chunks
}


def _model(variant, *overrides):
    cfg = longctx.load_config(TINY, overrides=[
        "model.attention.backend=linear", f"model.attention.linear.variant={variant}",
        *VARIANTS[variant], *overrides])
    return longctx.build_model(cfg.model, rngs=nnx.Rngs(0)), cfg


def _tokens(B, T, seed=0, vocab=256):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, vocab, jnp.int32)


def jit(fn):
    """``nnx.jit(fn)`` with LLVM at -O0 (~2.5x faster compiles of these small graphs;
    machine code only, no fast-math). ``fn(model, *args)``; the model is not mutated."""
    @functools.partial(jax.jit, static_argnums=0,
                       compiler_options={"xla_backend_optimization_level": 0})
    def run(graphdef, params, *args):
        return fn(nnx.merge(graphdef, params), *args)

    return lambda model, *args: run(*nnx.split(model), *args)


forward = jit(lambda m, t: m(t)[0])
step = jit(lambda m, t, s: m.step(t, s))


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_decoding_and_segments_match_the_one_pass_forward(variant):
    """Three checks on one model (one compile of the forward):

    * no logit depends on a later token (bitwise: masked terms are exact zeros);
    * token-by-token decoding (recurrent form, carried state) = the forward (chunk form);
    * model.segment_len=16 over T=50 (chunk form from carried state, padded last
      segment) = the forward.
    """
    model, cfg = _model(variant)
    T, t = 50, 29
    tok = _tokens(2, T, 1)
    full = forward(model, tok)
    assert full.shape == (2, T, 256) and bool(jnp.isfinite(full).all())

    changed = tok.at[:, t].set((tok[:, t] + 7) % cfg.model.vocab_size)
    other = forward(model, changed)
    np.testing.assert_array_equal(full[:, :t], other[:, :t])  # the past, bitwise
    assert not np.allclose(full[:, t:], other[:, t:])  # the change is seen from t on

    state = model.init_state(2)
    outs = []
    for i in range(T):
        logits, _, state = step(model, tok[:, i:i + 1], state)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)
    per_layer = layout.states_to_per_layer(cfg.model, state["layers"])
    assert [s["S"].dtype for s in per_layer] == [jnp.float32] * cfg.model.n_layers

    seg, _ = _model(variant, "model.segment_len=16")
    np.testing.assert_allclose(forward(seg, tok), full, atol=1e-4)


forward_ids = jit(lambda m, t, s: m(t, segment_ids=s)[0])
step_ids = jit(lambda m, t, s, ids: m.step(t, s, segment_ids=ids))


@pytest.mark.slow
def test_packed_documents_do_not_see_each_other(variant="gated_deltanet"):
    """Row 0 packs documents A (20 tokens) | B (30), row 1 packs B | C: B's logits are
    the same in both rows (the state resets and the conv stops at the boundary), and
    segment scanning (boundaries off the segment grid) and decoding with the ids
    carried in the state give the same logits as the one-pass forward."""
    model, _ = _model(variant)
    a, b, c = _tokens(1, 20, 4), _tokens(1, 30, 5), _tokens(1, 20, 6)
    tok = jnp.concatenate([jnp.concatenate([a, b], 1), jnp.concatenate([b, c], 1)], 0)
    ids = jnp.array([[1] * 20 + [2] * 30, [1] * 30 + [2] * 20], jnp.int32)
    packed = forward_ids(model, tok, ids)
    np.testing.assert_allclose(packed[0, 20:], packed[1, :30], atol=1e-5)

    seg, _ = _model(variant, "model.segment_len=16")
    np.testing.assert_allclose(forward_ids(seg, tok, ids), packed, atol=1e-4)

    state, outs = model.init_state(2), []
    for i in range(tok.shape[1]):
        logits, _, state = step_ids(model, tok[:, i:i + 1], state, ids[:, i:i + 1])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), packed, atol=1e-4)


@pytest.mark.parametrize("override,match", [
    ("model.attention.linear.variant=mamba",
     r"variant='mamba'; expected one of \('linear', 'retnet', 'gla', 'deltanet', "
     r"'gated_deltanet'"),
    ("model.attention.linear.feature_map=tanh", r"feature_map='tanh'; expected null or one of"),
    ("model.attention.linear.chunk_size=0", r"chunk_size=0"),
    ("model.attention.linear.normalize=true", r"normalize=true needs .*variant='gated_deltanet'"),
    ("model.attention.linear.variant=linear model.attention.linear.normalize=true "
     "model.attention.linear.feature_map=identity", r"feature_map='identity'"),
    ("model.attention.linear.chunk", r"did you mean model.attention.linear.chunk_size"),
    ("model.attention.linear.variant=kda model.attention.linear.feature_map=hedgehog",
     r"feature_map='hedgehog' needs a variant without a decay per key"),
])
def test_bad_linear_config_fails_at_load(override, match):
    overrides = ["model.attention.backend=linear"] + [
        o if "=" in o else o + "=1" for o in override.split(" ")]
    with pytest.raises(ConfigError, match=match):
        longctx.load_config(TINY, overrides=overrides)


def test_parameters_carry_logical_axes():
    model, _ = _model("gated_deltanet")
    specs = {"/".join(map(str, path)): v.get_metadata()["out_sharding"]
             for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # 2 layers stacked (model.scan_layers, the default): a leading, unsharded `layers` axis
    assert specs["stages/0/blocks/0/mixer/wq"] == ("layers", "embed", "heads", "head_dim")
    assert specs["stages/0/blocks/0/mixer/wo"] == ("layers", "heads", "head_dim", "embed")
    assert specs["stages/0/blocks/0/mixer/a_log"] == ("layers", "heads")


@pytest.mark.slow
def test_gla_with_retnet_bias_and_no_data_gate_is_retnet():
    """gate_bias_init=retnet and W1 = 0: logsigmoid(b) / 16 is RetNet's log-decay
    (closed form), and the GLA model computes the RetNet model's logits."""
    from longctx.backends.linear.mixer import retnet_log_decay

    base = ["model.attention.linear.conv_size=0", "model.attention.linear.chunk_size=16"]
    cfg = lambda v: longctx.load_config(TINY, overrides=[  # noqa: E731
        "model.attention.backend=linear", f"model.attention.linear.variant={v}",
        "model.attention.linear.gate_bias_init=retnet", *base])
    gla = longctx.build_model(cfg("gla").model, rngs=nnx.Rngs(0))
    ret = longctx.build_model(cfg("retnet").model, rngs=nnx.Rngs(1))
    H = gla.cfg.n_heads
    b = layout.params_of(gla)["blocks"][0]["mixer"]["b_gate"]
    np.testing.assert_allclose(jax.nn.log_sigmoid(b) / 16.0,
                               np.broadcast_to(retnet_log_decay(H)[:, None], b.shape), rtol=1e-5)
    flat_gla = dict(nnx.to_flat_state(nnx.state(gla, nnx.Param)))
    for path, v in nnx.to_flat_state(nnx.state(ret, nnx.Param)):
        v[...] = flat_gla[path][...]  # every shared weight from the GLA model
    params = layout.params_of(gla)  # per layer, whatever model.scan_layers
    for blk in params["blocks"].values():
        blk["mixer"]["w_gate1"] = jnp.zeros_like(blk["mixer"]["w_gate1"])
    layout.set_params(gla, params)
    tok = _tokens(2, 40, 3)
    np.testing.assert_allclose(forward(gla, tok), forward(ret, tok), atol=1e-5)


def test_hedgehog_feature_map_against_a_naive_reference():
    """feature_map=hedgehog (variant linear, normalised): one mixer, a random (non-identity)
    map W, against an independent numpy computation: phi(x) = softmax([x W, -x W]) per
    head, then causal normalised linear attention by its definition (a loop over t, keys
    0..t only: matching it is causality); the mixer runs two segments with its state
    ([B, H, 2K, V+1]) carried. The fresh W is the identity."""
    from longctx.backends.base import MixerDims
    from longctx.backends.linear.config import LinearConfig
    from longctx.backends.linear.mixer import LinearAttention
    from longctx.backends.linear.ops import NORMALIZE_EPS

    B, S, E, H, K = 2, 8, 8, 2, 3
    lin = LinearConfig(variant="linear", feature_map="hedgehog", normalize=True, conv_size=0,
                       chunk_size=4, output_norm=False, output_gate=False)
    lin.validate()
    mix = LinearAttention(MixerDims(d_model=E, n_heads=H, n_kv_heads=H, head_dim=K), lin,
                          rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(mix.hedgehog_q[...], np.broadcast_to(np.eye(K), (H, K, K)))
    rng = np.random.default_rng(0)
    for name in ("wq", "wk", "wv", "wo", "hedgehog_q", "hedgehog_k"):
        w = getattr(mix, name)
        w[...] = w[...] * (name[0] == "h") + jnp.asarray(  # hedgehog: identity + noise
            0.4 * rng.normal(size=w[...].shape), jnp.float32)
    x = rng.normal(size=(B, S, E)).astype(np.float32)
    seg = jit(lambda m, u, st: m(u, positions=None, state=st))  # one compile: two segments
    state = mix.init_state(B)
    assert state["S"].shape == (B, H, 2 * K, K + 1)  # 2K features, V + the normaliser
    y1, state = seg(mix, jnp.asarray(x[:, :4]), state)
    y2, _ = seg(mix, jnp.asarray(x[:, 4:]), state)

    P = {n: np.asarray(getattr(mix, n)[...], np.float64)
         for n in ("wq", "wk", "wv", "wo", "hedgehog_q", "hedgehog_k")}

    def phi(u, w):  # u [B, S, H, K], w [H, K, K]
        z = np.einsum("bshk,hkf->bshf", u, w)
        e = np.exp(np.concatenate([z, -z], -1))
        return e / e.sum(-1, keepdims=True)

    q = phi(np.einsum("bse,ehk->bshk", x, P["wq"]), P["hedgehog_q"])
    k = phi(np.einsum("bse,ehk->bshk", x, P["wk"]), P["hedgehog_k"])
    v = np.einsum("bse,ehk->bshk", x, P["wv"])
    o = np.zeros(v.shape)
    for t in range(S):
        a = np.einsum("bhf,bshf->bhs", q[:, t], k[:, :t + 1])  # causal: keys 0..t
        a = a * (2 * K) ** -0.5  # the op's scale F^-1/2 (F = 2K features) meets its eps
        o[:, t] = (np.einsum("bhs,bshv->bhv", a, v[:, :t + 1])
                   / (a.sum(-1)[..., None] + NORMALIZE_EPS))
    want = np.einsum("bshv,hve->bse", o, P["wo"])
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), want, rtol=2e-4, atol=2e-5)


def _loss_and_grads(model, tokens):
    graphdef, params = nnx.split(model)

    def loss(params, tokens):
        return jnp.mean(nnx.merge(graphdef, params)(tokens)[0].astype(jnp.float32) ** 2)

    fn = jax.jit(jax.value_and_grad(loss))
    return fn(params, tokens), fn.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_nested_checkpoints_change_no_gradient_and_cut_the_backward_scratch(monkeypatch):
    """The layer's nested checkpoints (mixer.REMAT_SECTIONS) only recompute: the same loss
    and gradients (float32 rounding of a different fusion), and the forward + backward's
    compiled scratch shrinks: 0.58x on this CPU without block remat (CPU runs them only when
    asked: the table is by platform, on for GPU / TPU) (`remat: full` on a
    CPU measured 0.98x: XLA:CPU's schedule peaks elsewhere; the 1B's figures under
    `remat: full` on a TPU are in docs/results/frontier_targets.md)."""
    from longctx.backends.linear import mixer

    model, _ = _model("gated_deltanet", "model.remat=none")
    tokens = _tokens(2, 50)
    runs = {}
    for nested in (True, False):
        monkeypatch.setattr(mixer, "REMAT_SECTIONS", {"cpu": nested})
        runs[nested] = _loss_and_grads(model, tokens)
    (loss, grads), temp = runs[True]
    (loss0, grads0), temp0 = runs[False]
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-8)
    assert temp <= 0.75 * temp0, (temp, temp0)
