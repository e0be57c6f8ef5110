"""Segment-scanned models in the trainer: the loss window by window (``segment_value_and_grad``)
equals the model's forward, and its memory does not grow with the length."""

import jax.numpy as jnp
import numpy as np
import pytest

from longctx.config import load_config


def _segment_case(*overrides, T=40, B=2):
    import jax
    from flax import nnx

    import longctx

    cfg = load_config("experiments/configs/tiny.yaml", list(overrides))
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
    batch = {"tokens": tok, "targets": jnp.roll(tok, -1, 1),
             "loss_mask": jnp.asarray(rng.random((B, T)) < 0.7, jnp.float32),
             "segment_ids": jnp.asarray(np.repeat([[1] * 17 + [2] * (T - 17)], B, 0))}
    return jax, nnx, model, batch


@pytest.mark.parametrize("overrides", [
    ("model.attention.backend=recurrent", "model.segment_len=8", "model.bptt_segments=2",
     "model.attention.recurrent.num_memory_tokens=2", "model.attention.recurrent.compressive=delta"),
    ("model.attention.backend=recurrent", "model.segment_len=8", "model.bptt_segments=0"),
    ("model.attention.backend=linear", "model.segment_len=16", "model.bptt_segments=1"),
    # hybrids: each layer carries its own kind of state through the windows
    ("model.attention.pattern=[linear, full]", "model.segment_len=8", "model.bptt_segments=2"),
    ("model.attention.pattern=[recurrent, linear]", "model.segment_len=8",
     "model.bptt_segments=2", "model.attention.recurrent.compressive=linear"),
])
def test_segment_windows_equal_the_model_forward(overrides):
    """Loss, accuracy and every gradient of the windowed path (T=40: the last segment and
    the last window padded) equal loss_fn on model(tokens) with the same BPTT cut."""
    from longctx.train import loss_fn, segment_value_and_grad

    jax, nnx, model, batch = _segment_case(*overrides)
    denom = batch["loss_mask"].sum()
    graphdef, state = nnx.split(model)
    (l_ref, m_ref), g_ref = jax.jit(lambda s, b: nnx.value_and_grad(  # jitted: eager is slower
        lambda m: loss_fn(m, b, denom), has_aux=True)(nnx.merge(graphdef, s)))(state, batch)
    (l_seg, m_seg), g_seg = jax.jit(
        lambda s, b: segment_value_and_grad(graphdef, s, b, denom))(state, batch)
    np.testing.assert_allclose(l_seg, l_ref, rtol=1e-5)
    np.testing.assert_allclose(m_seg["accuracy"], m_ref["accuracy"], rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_ref), nnx.to_flat_state(g_seg)):
        np.testing.assert_allclose(b[...], a[...], atol=2e-6, err_msg=str(path))


@pytest.mark.slow
def test_segment_windows_memory_does_not_grow_with_length():
    """Compiled scratch of a train step's gradients at 8x the length: within 1.3x."""
    from longctx.train import segment_value_and_grad

    def scratch(T):
        jax, nnx, model, batch = _segment_case(
            "model.attention.backend=recurrent", "model.segment_len=32", "model.bptt_segments=2",
            "model.attention.recurrent.num_memory_tokens=2", T=T, B=1)
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda s, b: segment_value_and_grad(graphdef, s, b, jnp.asarray(1.0)))
        return f.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    small, large = scratch(512), scratch(4096)
    assert large <= 1.3 * small, (small, large)
