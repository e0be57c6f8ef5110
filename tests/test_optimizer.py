"""The optimizer: warmup + decay schedules against their closed forms, the weight-decay mask."""

import jax.numpy as jnp
import numpy as np

from longctx.config import OptimConfig
from longctx.train.optimizer import decay_mask, lr_schedule


def test_warmup_then_cosine_closed_form():
    o = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    s = lr_schedule(o, total_steps=110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    # cosine: lr * (alpha + (1 - alpha) * (1 + cos(pi * t / T)) / 2)
    t = 50 / 100
    np.testing.assert_allclose(float(s(60)), 1e-3 * (0.1 + 0.9 * (1 + np.cos(np.pi * t)) / 2),
                               rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-5)


def test_linear_and_constant_schedules():
    lin = lr_schedule(OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 100)
    np.testing.assert_allclose([float(lin(0)), float(lin(50)), float(lin(100))], [1, 0.5, 0], atol=1e-6)
    const = lr_schedule(OptimConfig(lr=0.5, warmup_steps=0, schedule="constant"), 100)
    assert float(const(99)) == 0.5


def test_weight_decay_skips_norms_and_vectors():
    params = {"w": jnp.zeros((3, 4)), "norm": {"scale": jnp.ones((4,))}, "emb": jnp.zeros((5, 4))}
    assert decay_mask(params) == {"w": True, "norm": {"scale": False}, "emb": True}
