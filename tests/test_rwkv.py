"""RWKV-6 / RWKV-7 ops: float64 numpy loop = naive reference = recurrent = chunk.

The float64 loops here are written from the recurrences of issue 17 (independent
of the library): outputs and final states of every form against them; gradients
of every input (incl. ``initial_state`` and ``u``) between the forms and the
module's naive reference loop. Lengths are not multiples of the chunk.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx import ops

# LLVM at -O0 compiles these small graphs faster; machine code only, same XLA graph.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
B, T, H, K, V, CHUNK = 1, 21, 2, 8, 6, 8


def np_rwkv6(r, k, v, w, u, S, scale):
    r, k, v, w, u, S = (np.asarray(x, np.float64) for x in (r, k, v, w, u, S))
    o = np.zeros(v.shape)
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        o[:, t] = np.einsum("bhk,bhkv->bhv", scale * r[:, t], S + u[None, :, :, None] * kv)
        S = np.exp(w[:, t])[..., None] * S + kv
    return o, S


def np_rwkv7(r, w, k, v, a, b, S, scale):
    r, w, k, v, a, b, S = (np.asarray(x, np.float64) for x in (r, w, k, v, a, b, S))
    o = np.zeros(v.shape)
    for t in range(r.shape[1]):
        sa = np.einsum("bhk,bhkv->bhv", a[:, t], S)  # a_t^T S_{t-1}
        S = (np.exp(w[:, t])[..., None] * S + b[:, t, :, :, None] * sa[:, :, None, :]
             + k[:, t, :, :, None] * v[:, t, :, None, :])
        o[:, t] = np.einsum("bhk,bhkv->bhv", scale * r[:, t], S)
    return o, S


def _inputs(op, T=T, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    n = lambda i, *s: jax.random.normal(ks[i], s)  # noqa: E731
    S0 = 0.5 * n(0, B, H, K, V)
    if op == "rwkv6":
        w = -jnp.exp(n(4, B, T, H, K) - 1.0)  # RWKV-6: w = -exp(d)
        return dict(r=n(1, B, T, H, K), k=n(2, B, T, H, K), v=n(3, B, T, H, V), w=w,
                    u=0.5 * n(5, H, K), initial_state=S0)
    kap = n(5, B, T, H, K)
    kap = kap / jnp.linalg.norm(kap, axis=-1, keepdims=True)
    gate = jax.nn.sigmoid(n(6, B, T, H, K))
    return dict(r=n(1, B, T, H, K), w=-0.6 * jax.nn.sigmoid(n(4, B, T, H, K)),
                k=n(2, B, T, H, K) * 0.5, v=n(3, B, T, H, V), a=-kap, b=kap * gate,
                initial_state=S0)


FN = {"rwkv6": (ops.rwkv6, np_rwkv6), "rwkv7": (ops.rwkv7, np_rwkv7)}
REF = {"rwkv6": "rwkv6_reference", "rwkv7": "rwkv7_reference"}


def _loss(op, form):
    from longctx.backends.linear import rwkv

    def f(x, ct):
        if form == "naive":
            o, S = getattr(rwkv, REF[op])(**x)
        else:
            o, S = FN[op][0](**x, output_final_state=True, chunk_size=CHUNK, form=form)
        return jnp.sum(o * ct[0]) + jnp.sum(S * ct[1]), (o, S)
    return f


@pytest.mark.parametrize("op", ["rwkv6", "rwkv7"])
def test_forms_match_float64_loop_outputs_states_and_gradients(op):
    x = _inputs(op)
    ct = (jax.random.normal(jax.random.PRNGKey(9), (B, T, H, V)),
          jax.random.normal(jax.random.PRNGKey(8), (B, H, K, V)))
    o64, S64 = FN[op][1](*[x[n] for n in x if n != "initial_state"], x["initial_state"],
                         K ** -0.5)
    grads = {}
    for form in ("naive", "recurrent", "chunk"):
        (_, (o, S)), g = jit(jax.value_and_grad(_loss(op, form), has_aux=True))(x, ct)
        np.testing.assert_allclose(o, o64, rtol=2e-4, atol=2e-4, err_msg=f"{op} {form} o")
        np.testing.assert_allclose(S, S64, rtol=2e-4, atol=2e-4, err_msg=f"{op} {form} S")
        grads[form] = g
    for form in ("recurrent", "chunk"):
        for name in x:
            np.testing.assert_allclose(grads[form][name], grads["naive"][name], rtol=5e-4,
                                       atol=5e-4, err_msg=f"{op} {form} d{name}")
        assert float(jnp.abs(grads[form]["initial_state"]).max()) > 0


@pytest.mark.parametrize("op", ["rwkv6", "rwkv7"])
def test_strong_decay_long_sequence_finite(op):
    x = _inputs(op, T=4097, seed=1)
    x["w"] = jnp.full_like(x["w"], -8.0)
    (_, (o, S)), g = jit(jax.value_and_grad(_loss(op, "chunk"), has_aux=True))(
        x, (jnp.ones((B, 4097, H, V)), jnp.ones((B, H, K, V))))
    for y in (o, S, *jax.tree.leaves(g)):
        assert bool(jnp.all(jnp.isfinite(y)))
    # with exp(-8) per step the state forgets: the last output depends on the last tokens
    o_tail, _ = ops.rwkv7(**{n: x[n][:, -8:] for n in ("r", "w", "k", "v", "a", "b")}) \
        if op == "rwkv7" else ops.rwkv6(**{n: (x[n][:, -8:] if n != "u" else x[n])
                                           for n in ("r", "k", "v", "w", "u")})
    np.testing.assert_allclose(o[:, -1], o_tail[:, -1], rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_refused():
    x = _inputs("rwkv7")
    with pytest.raises(ValueError, match="a must have the shape"):
        ops.rwkv7(**{**x, "a": x["a"][..., :4]})
    with pytest.raises(ValueError, match="form="):
        ops.rwkv7(**x, form="fused")
    y = _inputs("rwkv6")
    with pytest.raises(ValueError, match="u must be"):
        ops.rwkv6(**{**y, "u": y["u"][:1]})
