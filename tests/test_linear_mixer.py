"""The `linear` backend inside the model: causality, decoding = forward, segments = one pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.config import ConfigError

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
}


def _model(variant, *overrides):
    cfg = longctx.load_config(TINY, overrides=[
        "model.attention.backend=linear", f"model.attention.linear.variant={variant}",
        *VARIANTS[variant], *overrides])
    return longctx.build_model(cfg.model, rngs=nnx.Rngs(0)), cfg


def _tokens(B, T, seed=0, vocab=256):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, vocab, jnp.int32)


forward = nnx.jit(lambda m, t: m(t)[0])
step = nnx.jit(lambda m, t, s: m.step(t, s))


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
    assert state["layers"][0]["S"].dtype == jnp.float32

    seg, _ = _model(variant, "model.segment_len=16")
    np.testing.assert_allclose(forward(seg, tok), full, atol=1e-4)


def test_segment_ids_are_refused_clearly():
    model, _ = _model("gla")
    tok = _tokens(1, 8)
    with pytest.raises(ValueError, match="does not support segment_ids"):
        model(tok, segment_ids=jnp.zeros_like(tok))


@pytest.mark.parametrize("override,match", [
    ("model.attention.linear.variant=mamba",
     r"variant='mamba'; expected one of \('linear', 'retnet', 'gla', 'deltanet', "
     r"'gated_deltanet'\)"),
    ("model.attention.linear.feature_map=tanh", r"feature_map='tanh'; expected null or one of"),
    ("model.attention.linear.chunk_size=0", r"chunk_size=0"),
    ("model.attention.linear.normalize=true", r"normalize=true needs .*variant='gated_deltanet'"),
    ("model.attention.linear.variant=linear model.attention.linear.normalize=true "
     "model.attention.linear.feature_map=identity", r"feature_map='identity'"),
    ("model.attention.linear.chunk", r"did you mean model.attention.linear.chunk_size"),
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
    assert specs["blocks/0/mixer/wq"] == ("embed", "heads", "head_dim")
    assert specs["blocks/0/mixer/wo"] == ("heads", "head_dim", "embed")
    assert specs["blocks/0/mixer/a_log"] == ("heads",)
