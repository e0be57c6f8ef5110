"""Hybrid layer patterns (model.attention.pattern): each layer its own backend and state.

For ``[linear, full]`` and ``[recurrent, linear]``, with segments: causality, decoding =
forward, segment scan = one pass, the trainer's windowed loss = loss(model(tokens)),
8-device sharded step = single device; and the config's errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.backends.full.mixer import FullAttention
from longctx.backends.linear.mixer import LinearAttention
from longctx.backends.recurrent.mixer import RecurrentAttention
from longctx.config import ConfigError
from longctx.model import layout

TINY = "experiments/configs/tiny.yaml"
FLASH = ["model.attention.impl=flash", "model.attention.block_q=16", "model.attention.block_k=16"]
PATTERNS = {
    # linear layers in chunks of 8 (several chunks per 16-token segment), full in flash blocks
    "linear-full": ["model.attention.pattern=[linear, full]",
                    "model.attention.linear.chunk_size=8", *FLASH],
    # recurrent with an XL cache covering the sequence (4 segments of 16 for T <= 64)
    "recurrent-linear": ["model.attention.pattern=[recurrent, linear]",
                         "model.attention.recurrent.cache_segments=3",
                         "model.attention.linear.variant=deltanet",
                         "model.attention.linear.chunk_size=8", *FLASH],
}


def _model(name, *extra, seed=0):
    cfg = longctx.load_config(TINY, [*PATTERNS[name], *extra])
    return longctx.build_model(cfg.model, rngs=nnx.Rngs(seed)), cfg


def _tokens(B, T, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, 256, jnp.int32)


@pytest.mark.slow
def test_pattern_builds_each_layer_with_its_backend():
    m, cfg = _model("recurrent-linear", "model.n_layers=4", "model.segment_len=16")
    assert [type(b.mixer) for b in layout.blocks_of(m)] == [RecurrentAttention,
                                                           LinearAttention] * 2
    assert layout.stages(cfg.model) == [layout.Stage(0, 2, 2, True)]  # one scan over 2 groups
    # each layer carries its own kind of state
    state = layout.states_to_per_layer(cfg.model, m.init_state(2)["layers"])
    assert "S" in state[1] and "k" in state[0] and "S" in state[3] and "k" in state[2]
    m, _ = _model("linear-full")
    assert [type(b.mixer) for b in layout.blocks_of(m)] == [LinearAttention, FullAttention]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PATTERNS))
def test_no_logit_depends_on_a_later_token(name):
    model, _ = _model(name, "model.segment_len=16")
    T, t = 50, 29
    tok = _tokens(2, T, 1)
    a, _ = model(tok)
    b, _ = model(tok.at[:, t].set((tok[:, t] + 7) % 256))
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PATTERNS))
def test_decoding_token_by_token_reproduces_the_forward(name):
    model, _ = _model(name, "model.segment_len=16")
    tok = _tokens(2, 36, 2)
    ref, _ = model(tok)
    step = nnx.jit(lambda m, t, s: m.step(t, s))
    state, outs = model.init_state(2), []
    for t in range(tok.shape[1]):
        logits, _, state = step(model, tok[:, t:t + 1], state)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), ref, atol=3e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PATTERNS))
def test_segment_scan_equals_one_pass_outputs_and_gradients(name):
    """T = 50 with 16-token segments: the last one padded. Same weights (segment_len does
    not change the parameters), so logits and every gradient must agree. The XL cache of
    `recurrent` is under stop_gradient (Transformer-XL), so there the loss that must give
    the same gradients is the first segment's (no cached key takes part)."""
    one, _ = _model(name)
    seg, _ = _model(name, "model.segment_len=16")
    tok = _tokens(2, 50, 3)
    np.testing.assert_allclose(one(tok)[0], seg(tok)[0], atol=3e-5)
    scored = 16 if name.startswith("recurrent") else 50

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(tok)[0][:, :scored])[..., 5])

    ga, gb = nnx.grad(loss)(one), nnx.grad(loss)(seg)
    for (path, x), (_, y) in zip(nnx.to_flat_state(ga), nnx.to_flat_state(gb)):
        np.testing.assert_allclose(x[...], y[...], atol=3e-6, err_msg=str(path))


def test_unknown_backend_in_pattern_fails_at_load_time():
    with pytest.raises(ConfigError, match=r"\['mamba'\] not registered.*\['full', 'linear', "
                                          r"'recurrent'\]"):
        longctx.load_config(TINY, ["model.attention.pattern=[linear, mamba]"])
    with pytest.raises(ConfigError, match=r"n_layers=2 must be a multiple of the length 3"):
        longctx.load_config(TINY, ["model.attention.pattern=[linear, linear, full]"])


def test_memory_tokens_need_every_layer_recurrent():
    with pytest.raises(ConfigError, match=r"every layer must be `recurrent`; only layers \[0\]"):
        longctx.load_config(TINY, ["model.attention.pattern=[recurrent, linear]",
                                   "model.segment_len=16",
                                   "model.attention.recurrent.num_memory_tokens=2"])


def test_full_layers_of_a_hybrid_keep_the_kv_cache_check():
    with pytest.raises(ConfigError, match=r"data.seq_len=2048 > model.max_seq_len=1024.*"
                                          r"`full` layers \[1\]"):
        longctx.load_config(TINY, ["model.attention.pattern=[linear, full]",
                                   "model.segment_len=16", "data.seq_len=2048"])
    longctx.load_config(TINY, ["model.attention.pattern=[linear, linear]",  # no full layer
                               "model.segment_len=16", "data.seq_len=2048"])
