"""The rwkv6 / rwkv7 variants of the `linear` backend inside the model: causality,
decoding step by step = the forward, segments = one pass; refusals."""

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
SMALL = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2", "model.n_layers=1",
         "model.mlp_dim=64", "model.attention.backend=linear",
         "model.attention.linear.chunk_size=8", "model.attention.linear.rwkv_low_rank=4"]


def _model(variant, *overrides):
    cfg = longctx.load_config(TINY, overrides=[
        *SMALL, f"model.attention.linear.variant={variant}", *overrides])
    return longctx.build_model(cfg.model, rngs=nnx.Rngs(0)), cfg


def jit(fn):
    """``nnx.jit(fn)`` with LLVM at -O0 (faster compiles of small graphs)."""
    @functools.partial(jax.jit, static_argnums=0,
                       compiler_options={"xla_backend_optimization_level": 0})
    def run(graphdef, params, *args):
        return fn(nnx.merge(graphdef, params), *args)

    return lambda model, *args: run(*nnx.split(model), *args)


forward = jit(lambda m, t: m(t)[0])
step = jit(lambda m, t, s: m.step(t, s))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["rwkv6", "rwkv7"])
def test_causal_decoding_and_segments_match_the_forward(variant):
    model, cfg = _model(variant)
    T, t = 21, 13  # 3 chunks of 8, the last padded
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, 256, jnp.int32)
    full = forward(model, tok)
    assert bool(jnp.isfinite(full).all())
    changed = tok.at[:, t].set((tok[:, t] + 7) % cfg.model.vocab_size)
    other = forward(model, changed)
    np.testing.assert_array_equal(full[:, :t], other[:, :t])  # the past, bitwise
    assert not np.allclose(full[:, t:], other[:, t:])  # seen from t on (incl. token shift)
    assert not np.allclose(full[:, t + 1], other[:, t + 1])

    state, outs = model.init_state(2), []
    for i in range(T):
        logits, _, state = step(model, tok[:, i:i + 1], state)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)
    per_layer = layout.states_to_per_layer(cfg.model, state["layers"])
    assert [s["S"].dtype for s in per_layer] == [jnp.float32] * cfg.model.n_layers

    seg, _ = _model(variant, "model.segment_len=8")
    np.testing.assert_allclose(forward(seg, tok), full, atol=1e-4)


def test_refusals():
    with pytest.raises(ConfigError, match="takes no feature map"):
        _model("rwkv7", "model.attention.linear.feature_map=silu")
    with pytest.raises(ConfigError, match="rwkv_low_rank=0"):
        _model("rwkv6", "model.attention.linear.rwkv_low_rank=0")
    model, _ = _model("rwkv6")
    tok = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(NotImplementedError, match="segment_ids"):
        model(tok, segment_ids=jnp.ones((1, 4), jnp.int32))
