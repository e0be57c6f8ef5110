"""longctx.generate with every backend: greedy = the teacher-forced argmax of model(tokens),
seeded sampling, EOS, and the CLI on a trained run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.generate import sample_logits

TINY = "experiments/configs/tiny.yaml"
SMALL = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_dim=64",
         "model.init_std=0.2"]  # larger logits: no near-ties between the two argmaxes
REC = "model.attention.recurrent."
MODELS = {
    "full": [],  # KV cache + the short q/k/v convolution's tail
    "linear": ["model.attention.backend=linear", "model.attention.linear.chunk_size=8"],
    # segments of 8: XL ring of one segment + memory tokens (the stack wrapper)
    "recurrent": ["model.attention.backend=recurrent", "model.segment_len=8",
                  REC + "cache_segments=1", REC + "num_memory_tokens=2"],
    # a hybrid whose second layer is a mixture of experts
    "hybrid-moe": ["model.attention.pattern=[linear, full]", "model.attention.linear.chunk_size=8",
                   "model.moe.num_experts=4", "model.moe.num_experts_per_tok=2",
                   "model.moe.every=2"],
}


def _model(name, seed=0):
    cfg = longctx.load_config(TINY, SMALL + MODELS[name])
    return longctx.build_model(cfg.model, rngs=nnx.Rngs(seed))


def _prompt(B=2, T=13, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, 256, jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_the_teacher_forced_argmax(name):
    model = _model(name)
    prompt = _prompt()
    out = longctx.generate(model, prompt, max_new_tokens=7)
    assert out.shape == (2, 20) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :13], prompt)
    logits, _ = model(out)  # the whole generated sequence in one forward
    np.testing.assert_array_equal(out[:, 13:], jnp.argmax(logits[:, 12:-1], -1))
    if name == "full":  # prefill in pieces: the same tokens
        np.testing.assert_array_equal(
            longctx.generate(model, prompt, max_new_tokens=7, prefill_chunk=5), out)


@pytest.mark.slow
def test_sampling_is_seeded_stays_in_the_top_k_and_stops_at_eos():
    model = _model("full")
    prompt = _prompt(3, 9, 1)
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=4)
    a = longctx.generate(model, prompt, seed=1, **kw)
    np.testing.assert_array_equal(a, longctx.generate(model, prompt, seed=1, **kw))
    assert not np.array_equal(a, longctx.generate(model, prompt, seed=2, **kw))
    logits, _ = model(a)  # every sampled token is among the 4 most likely at its position
    top4 = jax.lax.top_k(logits[:, 8:-1], 4)[1]
    assert bool((top4 == a[:, 9:, None]).any(-1).all())
    greedy = longctx.generate(model, prompt, max_new_tokens=12)
    # EOS: row 0 stops at its 3rd greedy token, the rows that never emit it are unchanged
    eos = int(greedy[0, 11])
    stopped = longctx.generate(model, prompt, max_new_tokens=12, eos_id=eos)
    np.testing.assert_array_equal(stopped[0, :12], greedy[0, :12])
    assert bool((stopped[0, 12:] == eos).all())
    for r in range(1, 3):
        if eos not in np.asarray(greedy[r, 9:]):
            np.testing.assert_array_equal(stopped[r], greedy[r])


@pytest.mark.slow
def test_sample_logits_top_k_1_is_greedy_and_top_p_keeps_the_smallest_nucleus():
    """The decode loop's sampler (generate calls exactly this on each step's logits)."""
    keys = jax.random.PRNGKey(0)
    rand = jax.random.normal(jax.random.PRNGKey(1), (64, 256))
    np.testing.assert_array_equal(
        sample_logits(rand, keys, temperature=1.0, top_k=1, top_p=None), jnp.argmax(rand, -1))
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    s = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=None, top_p=0.75))
    assert set(np.unique(s)) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    np.testing.assert_allclose((s == 0).mean(), 0.5 / 0.8, atol=0.04)
    s = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=None, top_p=1e-3))
    assert set(np.unique(s)) == {0}


def test_bad_arguments_fail_clearly():
    model = _model("full")
    with pytest.raises(ValueError, match="vocab_size=256"):
        longctx.generate(model, jnp.full((1, 4), 300), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        longctx.generate(model, _prompt(), max_new_tokens=2, temperature=1.0, top_p=0.0)
