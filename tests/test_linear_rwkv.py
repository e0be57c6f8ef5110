"""Kimi Delta Attention, RWKV-6, RWKV-7 ops: every form against float64 loops written here.

The ladder: naive (numpy float64, straight from the recurrences of issue 17) ->
recurrent -> chunk (the parallel chunk form) and chunk_scan (sequential chunks)
-> parallel, on outputs, final states and the gradient of every input incl. the
initial state; T = 45 is not a multiple of the chunk (32 = two per-key sub-chunks).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.backends.linear.ops import delta_rule, rwkv6, rwkv7

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
FORMS = ("parallel", "recurrent", "chunk", "chunk_scan")
B, T, H, K, V, C = 1, 45, 2, 16, 8, 32


def _inputs(op, T=T, seed=0, w_const=None, resets=False):
    r = jax.random.split(jax.random.PRNGKey(seed), 8)
    n = lambda i, shape: jax.random.normal(r[i], shape)  # noqa: E731
    x = {"q": n(0, (B, T, H, K)), "k": n(1, (B, T, H, K)), "v": n(2, (B, T, H, V)),
         "initial_state": 0.5 * n(3, (B, H, K, V))}
    w = -jax.nn.softplus(n(4, (B, T, H, K)) - 1.0) if w_const is None else jnp.full(
        (B, T, H, K), w_const)
    if resets:
        w = w.at[:, 7].set(-jnp.inf).at[:, 30, :, ::2].set(-jnp.inf)
    if op == "kda":
        x["k"] = x["k"] / jnp.linalg.norm(x["k"], axis=-1, keepdims=True)
        x["beta"] = jax.nn.sigmoid(n(5, (B, T, H)))
        x["g"] = w
    elif op == "rwkv6":
        x["w"] = w
        x["u"] = 0.5 * n(5, (H, K))
    else:  # rwkv7: a = -kappa_hat, b = kappa_hat * a_gate (normalised kappa_hat)
        kap = n(5, (B, T, H, K))
        kap = kap / jnp.linalg.norm(kap, axis=-1, keepdims=True)
        x["w"], x["a"] = w, -kap
        x["b"] = kap * jax.nn.sigmoid(n(6, (B, T, H, K)))
    return x


def _call(op, form, x, chunk=C):
    kw = dict(initial_state=x["initial_state"], output_final_state=True, chunk_size=chunk,
              form=form)
    if op == "kda":
        return delta_rule(x["q"], x["k"], x["v"], x["beta"], g=x["g"], **kw)
    if op == "rwkv6":
        return rwkv6(x["q"], x["k"], x["v"], x["w"], x["u"], **kw)
    return rwkv7(x["q"], x["w"], x["k"], x["v"], x["a"], x["b"], **kw)


def naive(op, x):
    """float64 loop over time; returns (o, final_state)."""
    f = {n: np.asarray(a, np.float64) for n, a in x.items()}
    q = f["q"] * K**-0.5
    S = f["initial_state"].copy()
    o = np.zeros((B, T, H, V))
    for t in range(T):
        qt, kt, vt = q[:, t], f["k"][:, t], f["v"][:, t]
        kv = kt[..., :, None] * vt[..., None, :]
        if op == "kda":
            S = S * np.exp(f["g"][:, t])[..., None]
            u = f["beta"][:, t, :, None] * (vt - np.einsum("bhk,bhkv->bhv", kt, S))
            S = S + kt[..., :, None] * u[..., None, :]
            o[:, t] = np.einsum("bhk,bhkv->bhv", qt, S)
        elif op == "rwkv6":
            o[:, t] = np.einsum("bhk,bhkv->bhv", qt, S + f["u"][None, :, :, None] * kv)
            S = np.exp(f["w"][:, t])[..., None] * S + kv
        else:
            aS = np.einsum("bhk,bhkv->bhv", f["a"][:, t], S)
            S = (np.exp(f["w"][:, t])[..., None] * S + f["b"][:, t][..., :, None] * aS[..., None, :]
                 + kv)
            o[:, t] = np.einsum("bhk,bhkv->bhv", qt, S)
    return o, S


@pytest.mark.slow
@pytest.mark.parametrize("op", ["kda", "rwkv6", "rwkv7"])
def test_ladder_outputs_states_and_every_gradient(op):
    """rwkv6 with hard resets (w = -inf) at step 7 and on every other key at step 30."""
    x = _inputs(op, resets=op == "rwkv6")
    wo = jax.random.normal(jax.random.PRNGKey(7), (B, T, H, V))
    wS = jax.random.normal(jax.random.PRNGKey(8), (B, H, K, V))

    @jit
    def run(x):
        def loss(form):
            def f(x):
                o, S = _call(op, form, x)
                return jnp.sum(o * wo) + jnp.sum(S * wS), (o, S)
            return jax.value_and_grad(f, has_aux=True)(x)
        return {form: loss(form) for form in FORMS}

    res = run(x)
    o_ref, S_ref = naive(op, x)
    ref_grads = res["parallel"][1]
    for form, ((_, (o, S)), grads) in res.items():
        assert S.dtype == jnp.float32
        np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=1e-4, err_msg=f"{op} {form} o")
        np.testing.assert_allclose(S, S_ref, rtol=1e-4, atol=1e-4, err_msg=f"{op} {form} S")
        for n, gr in grads.items():
            ref = ref_grads[n]
            assert bool(jnp.isfinite(gr).all()), f"{op} d{n} {form}"
            assert float(jnp.abs(ref).max()) > 0, f"{op} d{n}"
            np.testing.assert_allclose(gr, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()),
                                       err_msg=f"{op} d{n}: {form} vs parallel")


@pytest.mark.slow
@pytest.mark.parametrize("op", ["kda", "rwkv6", "rwkv7"])
def test_strong_decay_over_4k_tokens_stays_finite(op):
    """w = -8 every step over 4100 tokens: chunk form outputs, state and every gradient
    finite, outputs equal to the recurrent form's."""
    x = _inputs(op, T=4100, seed=3, w_const=-8.0)

    @jit
    def run(x):
        def f(x):
            o, S = _call(op, "chunk", x, chunk=64)
            return jnp.sum(o**2) + jnp.sum(S**2), (o, S)
        return jax.value_and_grad(f, has_aux=True)(x), _call(op, "recurrent", x)

    ((_, (o, S)), grads), (o_r, S_r) = run(x)
    for a in (o, S, *jax.tree.leaves(grads)):
        assert bool(jnp.isfinite(a).all()), op
    np.testing.assert_allclose(o, o_r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(S, S_r, rtol=1e-4, atol=1e-5)


def test_bad_shapes_name_their_values():
    x = _inputs("rwkv6", T=6)
    with pytest.raises(ValueError, match=r"rwkv6: u must be \[H, K\] = \(2, 16\)"):
        rwkv6(x["q"], x["k"], x["v"], x["w"], x["u"][:1])
    with pytest.raises(ValueError, match=r"rwkv7: a must have the shape of r"):
        rwkv7(x["q"], x["w"], x["k"], x["v"], x["w"][..., :4], x["w"])


@pytest.mark.slow
def test_factored_scores_condition():
    """The chunk forms take the factored per-key scores only where they are exact: with
    chunks of 8 the first half is steps 1..5, so a constant gate -c is fine up to 5c = 60;
    never with a reset. (The ladder above runs both branches: kda / rwkv7 factored,
    rwkv6 with resets and the w = -8 test on sub-chunks.)"""
    from longctx.backends.linear.blocks import FACTOR_MAX_EXP, factored_ok

    g = lambda c, T=20: jnp.full((1, T, 2, 3), -c)  # noqa: E731
    assert FACTOR_MAX_EXP == 60.0
    assert bool(factored_ok(g(12.0), 8)) and not bool(factored_ok(g(12.5), 8))
    assert not bool(factored_ok(g(0.1).at[0, 9, 1, 2].set(-jnp.inf), 8))
    assert bool(factored_ok(g(20.0, T=2), 8))  # T < chunk: one chunk of 2, halves of 2 and 0
    # Allowed but strong: 33 steps of -1.8 per half, 115 over the chunk; the masked upper
    # triangle of the factored product overflows (exp(+115)) and must not leak a nan.
    from longctx.backends.linear.blocks import _explicit_scores, cum_gate, factored_scores, tril

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 4))
    gi, ge = cum_gate(jnp.full((64, 4), -1.8))
    assert bool(factored_ok(jnp.full((1, 64, 1, 4), -1.8), 64))
    for gq in (gi, ge):
        A = factored_scores(x[0], x[1], gq, gi, tril(64, True))
        np.testing.assert_allclose(A, _explicit_scores(x[0], x[1], gq, gi, tril(64, True)),
                                   rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda x, w: jnp.sum(factored_scores(
        x[0], x[1], cum_gate(w)[1], cum_gate(w)[0], tril(64, True)) ** 2), argnums=(0, 1))(
        x, jnp.full((64, 4), -1.8))
    assert all(bool(jnp.isfinite(gr).all()) for gr in grads)
