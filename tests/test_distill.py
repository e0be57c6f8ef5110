"""Distillation from a parent: the loss against a naive formula and its closed-form
gradient, the schedule, alpha = 0 equal to plain training, the config section. (The trainer
run with a parent and alpha > 0: tests/test_inherit_cli.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import longctx
from longctx.config import ConfigError
from longctx.inherit.distill_config import DistillConfig
from longctx.train.distill import Distiller, distill_terms
from longctx.train.step import make_train_step

B, T, V = 2, 8, 11


def _naive(z, zp, y, m, temp):
    """Per-token CE and T^2 KL(p || q) in float64 numpy, summed over the mask."""
    def log_softmax(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))
    z, zp = np.float64(z), np.float64(zp)
    ce = -np.take_along_axis(log_softmax(z), y[..., None], -1)[..., 0]
    lp, lq = log_softmax(zp / temp), log_softmax(z / temp)
    kl = (np.exp(lp) * (lp - lq)).sum(-1) * temp ** 2
    return (ce * m).sum(), (kl * m).sum()


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_terms_match_naive_formula_and_gradient(temp):
    k = jax.random.split(jax.random.key(0), 3)
    z = 3 * jax.random.normal(k[0], (B, T, V))
    zp = 3 * jax.random.normal(k[1], (B, T, V))
    y = jax.random.randint(k[2], (B, T), 0, V)
    m = jnp.ones((B, T)).at[0, :3].set(0.0)
    ce, kl = distill_terms(z, zp, y, m, temperature=temp)
    want_ce, want_kl = _naive(z, zp, np.asarray(y), np.asarray(m), temp)
    np.testing.assert_allclose([ce, kl], [want_ce, want_kl], rtol=1e-5)
    # d/dz T^2 KL(p || softmax(z / T)) = T (softmax(z / T) - p), per scored token
    g = jax.grad(lambda z: distill_terms(z, zp, y, m, temperature=temp)[1])(z)
    want = temp * (jax.nn.softmax(z / temp) - jax.nn.softmax(zp / temp)) * m[..., None]
    np.testing.assert_allclose(g, want, atol=1e-5)
    gp = jax.grad(lambda zp: distill_terms(z, zp, y, m, temperature=temp)[1])(zp)
    assert not np.any(gp)  # the parent is a constant


def test_schedule_and_section():
    dc = DistillConfig(parent="runs/p", alpha=0.5, steps=10)
    assert [dc.alpha_at(s) for s in (0, 5, 10, 20)] == [0.5, 0.25, 0.0, 0.0]
    assert DistillConfig(parent="p", alpha=0.2).alpha_at(100) == 0.2
    cfg = longctx.load_config("experiments/configs/tiny.yaml",
                              ["distill.parent=runs/p", "distill.alpha=0.2"])
    assert cfg.distill.alpha == 0.2
    with pytest.raises(ConfigError, match="distill.alpha=0.3 needs distill.parent"):
        longctx.load_config("experiments/configs/tiny.yaml", ["distill.alpha=0.3"])
    with pytest.raises(ConfigError, match="distill.temperature=0.0 must be > 0"):
        longctx.load_config("experiments/configs/tiny.yaml", ["distill.temperature=0"])
    with pytest.raises(ConfigError, match="unknown config key 'inherit'"):  # the section's name
        longctx.load_config("experiments/configs/tiny.yaml", ["inherit.parent=runs/p"])


def test_alpha_zero_is_plain_training():
    cfg = longctx.load_config("experiments/configs/tiny.yaml", [
        "model.d_model=32", "model.n_layers=1", "model.mlp_dim=64", "model.vocab_size=32",
        "data.seq_len=16"])

    def state_of(seed, tx):
        model = longctx.build_model(cfg.model, rngs=nnx.Rngs(seed))
        return nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

    gdef, s0 = state_of(0, optax.sgd(1.0))  # the update is the gradient: compared as is
    pdef, pstate = nnx.split((longctx.build_model(cfg.model, rngs=nnx.Rngs(1)),))
    tok = jax.random.randint(jax.random.key(3), (4, 17), 0, 32)
    batch = {"tokens": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": jnp.ones((4, 16))}
    plain = jax.jit(make_train_step(gdef, 1))
    # alpha = 0 with 2 microbatches (they slice the parent's logits with the tokens)
    zero = jax.jit(make_train_step(gdef, 2, distill=Distiller(pdef, DistillConfig(
        parent="p", alpha=0.0))))
    (sa, ma), (sb, mb) = plain(s0, batch), zero(s0, batch, pstate)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 nnx.to_pure_dict(sa), nnx.to_pure_dict(sb))
