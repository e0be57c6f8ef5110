"""RoPE scalings for context extension: the NTK-aware base change against its closed form and
transformers, the config's refusals, and each method's promise at lengths <= the trained
length (dynamic NTK below ``original_max_position_embeddings``; every static method at
factor 1) checked on a model's logits."""

import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.config import ConfigError, load_config
from longctx.rope import rope_frequencies
from longctx.rope_config import ROPE_TYPES, RopeScalingConfig, ntk_theta

L0 = 32  # the "trained" length of the logits tests
SMALL = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
         "model.n_kv_heads=1", "model.mlp_dim=64", "model.attention.conv_size=0",
         "model.init_std=0.2"]  # large weights: attention (and so RoPE) matters to the logits


@pytest.mark.parametrize("D,theta,s", [(32, 1e4, 4.0), (64, 5e5, 8.0), (128, 1e4, 2.5)])
def test_ntk_is_the_base_change_that_interpolates_only_the_slowest_frequency(D, theta, s):
    inv0, _ = rope_frequencies(D, theta, RopeScalingConfig())
    inv, att = rope_frequencies(D, theta, RopeScalingConfig(type="ntk", factor=s))
    assert att == 1.0
    # YaRN paper eq. 16: b' = b * s^(D / (D - 2)), theta_i = b'^(-2i / D)
    np.testing.assert_allclose(inv, (theta * s ** (D / (D - 2))) ** (-np.arange(0, D, 2) / D),
                               rtol=1e-12)
    assert inv[0] == inv0[0]  # the fastest dimension extrapolates ...
    assert inv[-1] == pytest.approx(inv0[-1] / s, rel=1e-12)  # ... the slowest interpolates
    ratio = inv0 / inv  # and in between the stretch grows geometrically from 1 to s
    np.testing.assert_allclose(ratio, s ** (np.arange(D // 2) / (D // 2 - 1)), rtol=1e-12)


def test_ntk_matches_transformers_dynamic_ntk_at_its_fixed_point():
    """HF's dynamic NTK with factor 1 at length ``s L`` is the base ``theta s^(D/(D-2))``:
    transformers' own init function is the reference for the fixed base change."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    D, theta, L, s = 32, 10_000.0, 128, 4
    cfg = transformers.LlamaConfig(hidden_size=D * 2, num_attention_heads=2,
                                   max_position_embeddings=L, rope_parameters=dict(
                                       rope_type="dynamic", rope_theta=theta, factor=1.0))
    with torch.no_grad():
        ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=s * L)
    inv, _ = rope_frequencies(D, theta, RopeScalingConfig(type="ntk", factor=s))
    np.testing.assert_allclose(inv, ref.double().numpy(), rtol=1e-6)


def test_scaling_config_refusals_name_the_value_and_the_choices():
    with pytest.raises(ConfigError, match=r"model.rope_scaling.type='ntk_by_parts'; expected "
                                          r"one of \('none', 'linear', 'ntk', 'dynamic'"):
        load_config(None, ["model.rope_scaling.type=ntk_by_parts"])
    with pytest.raises(ConfigError, match=r"factor=0.5 with type 'ntk' must be >= 1"):
        load_config(None, ["model.rope_scaling={type: ntk, factor: 0.5}"])
    with pytest.raises(ConfigError, match=r"factor=0.0 must be > 0"):
        load_config(None, ["model.rope_scaling={type: yarn, factor: 0, "
                           "original_max_position_embeddings: 64}"])
    with pytest.raises(ValueError, match="head_dim=3"):
        ntk_theta(1e4, 2.0, 3)
    assert "ntk" in ROPE_TYPES
    assert load_config(None, ["model.rope_scaling={type: ntk, factor: 4}"]).model.rope_scaling \
        == RopeScalingConfig(type="ntk", factor=4.0)


def _logits(scaling: str, tokens):
    cfg = load_config(None, [*SMALL, f"model.rope_scaling={scaling}"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))  # the same weights every time
    return np.asarray(model(tokens)[0])


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 64, (2, 2 * L0)).astype(np.int32)


@pytest.fixture(scope="module")
def unscaled(tokens):
    return {T: _logits("{type: none}", tokens[:, :T]) for T in (L0 // 2, L0, 2 * L0)}


@pytest.mark.parametrize("scaling", [
    "{type: linear, factor: 1}", "{type: ntk, factor: 1}",
    f"{{type: yarn, factor: 1, original_max_position_embeddings: {L0}}}",
    f"{{type: llama3, factor: 1, original_max_position_embeddings: {L0}}}"])
def test_static_methods_at_factor_one_are_the_unscaled_model(scaling, tokens, unscaled):
    for T in (L0 // 2, L0, 2 * L0):  # any length: factor 1 changes no frequency
        np.testing.assert_allclose(_logits(scaling, tokens[:, :T]), unscaled[T], atol=2e-5,
                                   rtol=0)


def test_dynamic_ntk_is_the_unscaled_model_up_to_the_trained_length(tokens, unscaled):
    dyn = f"{{type: dynamic, factor: 8, original_max_position_embeddings: {L0}}}"
    for T in (L0 // 2, L0):
        np.testing.assert_array_equal(_logits(dyn, tokens[:, :T]), unscaled[T])
    # beyond it the base grows with the length: every position changes, the first included
    # (the frequencies follow the call's length) -- the comparison above can fail
    longer = _logits(dyn, tokens)
    assert np.abs(longer - unscaled[2 * L0]).max(axis=(0, 2))[1:].min() > 1e-3


@pytest.mark.parametrize("scaling", [
    "{type: linear, factor: 4}", "{type: ntk, factor: 4}",
    f"{{type: yarn, factor: 4, original_max_position_embeddings: {L0}}}"])
def test_scaled_static_methods_change_short_context_logits(scaling, tokens, unscaled):
    """What they do not promise: at factor 4 they move the logits within the trained length
    (position interpolation and NTK change the frequencies everywhere; YaRN also scales the
    attention logits). The equalities above are not vacuous."""
    assert np.abs(_logits(scaling, tokens[:, :L0]) - unscaled[L0]).max() > 1e-3


def test_ntk_model_exports_to_transformers_as_plain_rope_of_the_larger_base(tmp_path, tokens):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from longctx import hf

    cfg = load_config(None, [*SMALL, "model.rope_scaling={type: ntk, factor: 4}"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    out = hf.save(model, cfg.model, str(tmp_path / "hf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.rope_parameters["rope_type"] == "default"
    assert back.config.rope_parameters["rope_theta"] == pytest.approx(
        cfg.model.rope_theta * 4 ** (16 / 14))
    with torch.no_grad():
        ref = back(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    got = np.asarray(model(tokens)[0])
    np.testing.assert_allclose(got / np.abs(ref).max(), ref / np.abs(ref).max(), atol=1e-4)
