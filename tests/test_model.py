"""The model: shapes, causality, decoding = forward, segment scanning, truncated BPTT."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.rope import rope
from longctx.rope_config import RopeScalingConfig
from longctx.model import layout

TINY = "experiments/configs/tiny.yaml"


def _model(*overrides, seed=0):
    cfg = longctx.load_config(TINY, overrides=list(overrides))
    return longctx.build_model(cfg.model, rngs=nnx.Rngs(seed)), cfg


def _tokens(B, T, seed=0, vocab=256):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, vocab, jnp.int32)


@pytest.mark.slow
def test_public_api_shapes_and_dtypes():
    model, cfg = _model()
    logits, aux = model(_tokens(2, 256))
    assert logits.shape == (2, 256, cfg.model.vocab_size) and logits.dtype == jnp.float32
    assert aux == {}
    params = nnx.state(model, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_parameters_carry_logical_axes():
    for scan in (True, False):  # stacked layers gain a leading, unsharded `layers` axis
        model, _ = _model("model.tie_embeddings=false", f"model.scan_layers={str(scan).lower()}")
        specs = {"/".join(map(str, path)): v.get_metadata()["out_sharding"]
                 for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        layer, lead = ("stages/0/blocks/0/", ("layers",)) if scan else ("blocks/{i}/", ())
        assert specs["embed/embedding"] == ("vocab", "embed")
        assert specs["lm_head"] == ("embed", "vocab")
        assert specs[layer.format(i=0) + "mixer/wq"] == (*lead, "embed", "heads", "head_dim")
        assert specs[layer.format(i=0) + "mixer/wk"] == (*lead, "embed", "kv_heads", "head_dim")
        assert specs[layer.format(i=1) + "mlp/w_down"] == (*lead, "mlp", "embed")
        assert specs["final_norm/scale"] == ("embed",)


VARIANTS = {
    "flash": ["model.attention.impl=flash", "model.attention.block_q=16",
              "model.attention.block_k=16"],
    "xla": ["model.attention.impl=xla"],
    "window": ["model.attention.impl=flash", "model.attention.window=9",
               "model.attention.block_q=16", "model.attention.block_k=16"],
    "segments": ["model.segment_len=16"],
    "segments-bptt": ["model.segment_len=16", "model.bptt_segments=1"],
    "mqa-untied": ["model.n_kv_heads=1", "model.tie_embeddings=false"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_no_logit_depends_on_a_later_token(name):
    model, cfg = _model(*VARIANTS[name])
    T, t = 50, 29
    tok = _tokens(2, T, 1)
    changed = tok.at[:, t].set((tok[:, t] + 7) % cfg.model.vocab_size)
    a, _ = model(tok)
    b, _ = model(changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])  # the past is untouched, bitwise
    assert not np.allclose(a[:, t:], b[:, t:])  # and the change is seen from t on


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xla", "window", "mqa-untied"])
def test_decoding_token_by_token_reproduces_the_forward(name):
    model, _ = _model(*VARIANTS[name])
    tok = _tokens(2, 40, 2)
    full, _ = model(tok)
    step = nnx.jit(lambda m, t, s: m.step(t, s))
    state = model.init_state(2)
    outs = []
    for t in range(tok.shape[1]):
        logits, _, state = step(model, tok[:, t:t + 1], state)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
    assert int(state["next_pos"][0]) == 40


@pytest.mark.slow
def test_segment_scan_equals_one_pass_outputs_and_gradients():
    """T not a multiple of segment_len: the last segment is padded and dropped."""
    flash = ["model.attention.impl=flash", "model.attention.block_q=16",
             "model.attention.block_k=16"]
    one, _ = _model(*flash)
    seg, _ = _model(*flash, "model.segment_len=16")
    tok = _tokens(2, 70, 3)
    a, _ = one(tok)
    b, _ = seg(tok)
    np.testing.assert_allclose(a, b, atol=2e-5)

    def loss(m):
        logits, _ = m(tok)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    ga, gb = nnx.grad(loss)(one), nnx.grad(loss)(seg)
    for (path, x), (_, y) in zip(nnx.to_flat_state(ga), nnx.to_flat_state(gb)):
        np.testing.assert_allclose(x[...], y[...], atol=2e-6, err_msg=str(path))


@pytest.mark.slow
def test_truncated_bptt_cuts_gradients_across_segments():
    """Loss on the last segment only: with bptt_segments=1 the tokens of the first
    segment get no gradient (their keys reach the loss only through carried state)."""
    T, N = 48, 16
    # Segment 0 uses token ids 0..15 only, later segments ids >= 100.
    tok = jnp.concatenate([jnp.arange(16)[None], _tokens(1, T - N, 4, 100) + 100], 1)

    def grad_rows(*overrides):
        m, _ = _model("model.segment_len=16", *overrides)

        def loss(m):
            logits, _ = m(tok)
            return jnp.sum(logits[:, 2 * N:] ** 2)

        g = nnx.grad(loss)(m)
        return np.abs(np.asarray(g.embed.embedding[...][:16])).sum(axis=1)

    full_grad = grad_rows()
    cut = grad_rows("model.bptt_segments=1")
    # Rows 0..15 still get gradient through the tied LM head; compare with a
    # model where the same ids never appear: the difference is the BPTT path.
    assert (full_grad > cut).all()
    two = grad_rows("model.bptt_segments=2")  # segment 2 reaches back to segment 0? no:
    # cut at segment 2 (2 % 2 == 0): segment 0's state is stopped before segment 2.
    np.testing.assert_allclose(two, cut, rtol=1e-5)
    far = grad_rows("model.bptt_segments=3")  # no cut before segment 3: same as none
    np.testing.assert_allclose(far, full_grad, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "minimal", "dots"])
def test_remat_gives_the_same_gradients(policy):
    base, _ = _model()
    remat, _ = _model(f"model.remat={policy}")
    tok = _tokens(2, 32, 5)
    loss = lambda m: jnp.mean(m(tok)[0] ** 2)  # noqa: E731
    for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.grad(loss)(base)),
                              nnx.to_flat_state(nnx.grad(loss)(remat))):
        np.testing.assert_allclose(x[...], y[...], rtol=1e-5, atol=1e-8, err_msg=str(p))


@pytest.mark.slow
def test_full_remat_of_a_scanned_hybrid_moe_group_gives_the_same_gradients():
    """``remat: full`` is a custom VJP (its recomputation waits for the cotangent): a
    scanned group of two different blocks with MoE feed-forwards, the aux losses in the
    objective, gives the gradients of no remat."""
    ov = ["model.attention.pattern=[linear, full]", "model.n_layers=4",
          "model.scan_layers=true", "model.moe.num_experts=4",
          "model.moe.num_experts_per_tok=2", "model.moe.load_balance_loss_weight=0.1"]
    base, _ = _model(*ov)
    remat, _ = _model(*ov, "model.remat=full")
    tok = _tokens(2, 32, 7)

    def loss(m):
        logits, aux = m(tok)
        assert aux, "the MoE aux losses are part of the objective"
        return jnp.mean(logits ** 2) + sum(jnp.sum(v) for v in aux.values())

    for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.grad(loss)(base)),
                              nnx.to_flat_state(nnx.grad(loss)(remat))):
        np.testing.assert_allclose(x[...], y[...], rtol=1e-5, atol=1e-8, err_msg=str(p))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits():
    model, _ = _model("model.dtype=bfloat16")
    logits, _ = model(_tokens(2, 32))
    ref, _ = _model()
    assert logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(logits, ref(_tokens(2, 32))[0], atol=0.05)


def test_rope_is_relative_and_scaling_interpolates():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 2, 16))
    y = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 2, 16))
    pos = jnp.arange(6)[None]
    dots = lambda off, **kw: jnp.einsum(  # noqa: E731
        "bshd,bthd->bhst", rope(x, pos + off, **kw), rope(y, pos + off, **kw))
    np.testing.assert_allclose(dots(0), dots(1000), atol=1e-3)  # depends on i - j only
    np.testing.assert_allclose(rope(x, pos * 4, scaling=RopeScalingConfig(type="linear", factor=4.0)), rope(x, pos), atol=1e-5)
    np.testing.assert_allclose(rope(x, jnp.zeros_like(pos)), x, atol=1e-6)  # position 0


def test_bad_tokens_fail_clearly():
    model, _ = _model()
    with pytest.raises(ValueError, match=r"vocab_size=256.*max 256"):
        model(jnp.full((1, 4), 256, jnp.int32))
    with pytest.raises(ValueError, match="int array"):
        model(jnp.zeros((1, 4), jnp.float32))


def _holds_whole_config(module) -> list[str]:
    """Attributes anywhere in ``module`` that are a whole model / attention config."""
    from longctx.config import AttentionConfig, Config, ModelConfig

    return [f"{'/'.join(map(str, path))}.{k}" for path, m in nnx.iter_modules(module)
            for k, v in vars(m).items() if isinstance(v, (Config, ModelConfig, AttentionConfig))]


@pytest.mark.slow
def test_layers_read_only_their_section():
    """Each mixer and the MoE layer is built from explicit sizes and its own section alone
    (no ModelConfig anywhere), and computes the same function as the same layer built by
    the model from a whole config with the same random stream."""
    from longctx.backends.base import MixerDims
    from longctx.backends.full.config import FullConfig
    from longctx.backends.full.mixer import FullAttention
    from longctx.backends.linear.config import LinearConfig
    from longctx.backends.linear.mixer import LinearAttention
    from longctx.backends.recurrent.config import RecurrentConfig
    from longctx.backends.recurrent.mixer import RecurrentAttention
    from longctx.model.transformer import mixer_dims
    from longctx.moe.config import MoEConfig
    from longctx.moe.layer import MoE

    dims = MixerDims(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, out_std=0.01,
                     segment_len=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 32))
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    layers = {
        "full": FullAttention(dims, FullConfig(conv_size=3), rngs=nnx.Rngs(0)),
        "linear": LinearAttention(dims, LinearConfig(variant="gla"), rngs=nnx.Rngs(0)),
        "recurrent": RecurrentAttention(dims, FullConfig(), RecurrentConfig(compressive="delta"),
                                        rngs=nnx.Rngs(0)),
    }
    for name, mixer in layers.items():
        assert not _holds_whole_config(mixer), name
        y, state = mixer(x, positions=pos, state=mixer.init_state(2, jnp.float32))
        assert y.shape == x.shape and state is not None
    moe = MoE(32, MoEConfig(num_experts=4), mlp_dim=16, rngs=nnx.Rngs(0))
    assert not _holds_whole_config(moe) and moe(x)[0].shape == x.shape

    # The model builds the same layer from a whole config: same sizes, same function
    # (unrolled layers: layer 0's own module, compared with one built alone).
    cfg = longctx.load_config(TINY, ["model.attention.backend=linear", "model.scan_layers=false",
                                     "model.attention.linear.variant=gla"]).model
    model = longctx.build_model(cfg, rngs=nnx.Rngs(0))
    mixer = model.blocks[0].mixer
    alone = LinearAttention(mixer_dims(cfg), cfg.attention.linear, rngs=nnx.Rngs(0))
    nnx.update(alone, nnx.state(mixer))
    xm = jax.random.normal(jax.random.PRNGKey(1), (1, 8, cfg.d_model))
    posm = jnp.arange(8)[None]
    np.testing.assert_array_equal(alone(xm, positions=posm)[0], mixer(xm, positions=posm)[0])
    assert not _holds_whole_config(model.blocks)


@pytest.mark.slow
def test_conv_starts_as_plain_attention_and_decodes_exactly():
    plain, _ = _model()
    conv, _ = _model("model.attention.conv_size=4")
    tok = _tokens(2, 24, 6)
    np.testing.assert_allclose(conv(tok)[0], plain(tok)[0], atol=1e-6)  # identity kernel
    # Perturb the kernels so that the conv matters, then check decode / segments / causality.
    params = layout.params_of(conv)  # per layer, whatever model.scan_layers
    for blk in params["blocks"].values():
        for name in ("conv_q", "conv_k", "conv_v"):
            w = blk["mixer"][name]
            blk["mixer"][name] = w + 0.3 * jax.random.normal(jax.random.PRNGKey(1), w.shape)
    layout.set_params(conv, params)
    full, _ = conv(tok)
    assert not np.allclose(full, plain(tok)[0], atol=1e-3)
    state, outs = conv.init_state(2), []
    for t in range(tok.shape[1]):
        logits, _, state = conv.step(tok[:, t:t + 1], state)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
    seg_cfg = dataclasses.replace(conv.cfg, segment_len=5)
    seg_model = longctx.build_model(seg_cfg, rngs=nnx.Rngs(0))
    nnx.update(seg_model, nnx.state(conv))
    np.testing.assert_allclose(seg_model(tok)[0], full, atol=2e-5)
    changed = tok.at[:, 10].set((tok[:, 10] + 1) % 256)
    np.testing.assert_array_equal(conv(changed)[0][:, :10], full[:, :10])


def test_conv_taps_do_not_cross_documents():
    model, _ = _model("model.attention.conv_size=4")
    params = layout.params_of(model)
    for blk in params["blocks"].values():
        blk["mixer"]["conv_k"] = blk["mixer"]["conv_k"].at[0].set(0.7)
    layout.set_params(model, params)
    tok = _tokens(1, 16, 7)
    seg = jnp.asarray([[1] * 6 + [2] * 10], jnp.int32)
    a, _ = model(tok, segment_ids=seg)
    b, _ = model(tok.at[:, 4].set((tok[:, 4] + 3) % 256), segment_ids=seg)
    np.testing.assert_allclose(a[:, 6:], b[:, 6:], atol=1e-6)  # document 2 untouched


def test_grads_together_is_the_identity_whose_cotangents_pass_one_barrier():
    """layers.grads_together: values and gradients unchanged; in the backward the
    cotangents of all its inputs come out of one optimization_barrier (so a layer's input
    cotangent cannot be used before its weights' gradients exist)."""
    from longctx.layers import grads_together

    x, w = jnp.arange(6.0).reshape(2, 3), jnp.arange(12.0).reshape(3, 4) / 7

    def f(x, w, tie):
        if tie:
            x, w = grads_together(x, w)
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    np.testing.assert_array_equal(grads_together(x, w)[1], w)
    g, g0 = (jax.grad(f, argnums=(0, 1))(x, w, tie) for tie in (True, False))
    for a, b in zip(g, g0):
        np.testing.assert_array_equal(a, b)
    bwd = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)), static_argnums=2)(x, w, True)
    barriers = [e for e in bwd.jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    assert len(barriers) == 1 and len(barriers[0].invars) == 2
