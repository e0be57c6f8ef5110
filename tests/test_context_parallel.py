"""Context parallelism on 8 simulated CPU devices: ring / all-gather attention equal dense
attention (``jax.nn.dot_product_attention`` with an explicit mask) on outputs and on
dq / dk / dv, with and without the zigzag load balance; work balance counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from longctx.parallel import context


def _mesh(data, seq):
    return jax.make_mesh((data, seq), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:data * seq])


def _dense(q, k, v, causal, window, seg):
    """The independent reference: jax.nn.dot_product_attention under an explicit mask."""
    T = q.shape[1]
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    m = np.ones((T, T), bool)
    if causal:
        m &= j <= i
    if window is not None:
        m &= (i - j < window) & ((j - i < window) | causal)
    mask = jnp.asarray(m)[None, None]
    if seg is not None:
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _inputs(B, T, Hq, Hkv, D=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, Hq, D))
    k = jax.random.normal(ks[1], (B, T, Hkv, D))
    v = jax.random.normal(ks[2], (B, T, Hkv, D))
    seg = jnp.sort(jax.random.randint(ks[3], (B, T), 0, 3), axis=1)  # packed documents
    return q, k, v, seg


CASES = [  # strategy, load_balance, causal, window, segments, Hkv, mesh (data, sequence)
    ("ring", True, True, None, False, 1, (2, 4)),
    ("ring", False, False, 7, True, 2, (2, 4)),
    ("all_gather", True, True, 5, True, 1, (2, 4)),
    ("all_gather", False, True, None, False, 4, (1, 8)),
]


@pytest.mark.parametrize("strategy,lb,causal,window,use_seg,hkv,mesh", CASES,
                         ids=[f"{c[0]}-lb{int(c[1])}-causal{int(c[2])}-W{c[3]}-seg{int(c[4])}"
                              f"-Hkv{c[5]}-sp{c[6][1]}" for c in CASES])
def test_matches_dense_outputs_and_gradients(strategy, lb, causal, window, use_seg, hkv, mesh):
    q, k, v, seg = _inputs(2, 32, 4, hkv)
    seg = seg if use_seg else None
    kw = dict(causal=causal, window=window, segment_ids=seg)

    def f(q, k, v):
        return context.attention(q, k, v, strategy=strategy, load_balance=lb, **kw)

    def r(q, k, v):
        return _dense(q, k, v, causal, window, seg)

    w = jax.random.normal(jax.random.key(9), q.shape)  # a cotangent that is not all ones
    with jax.set_mesh(_mesh(*mesh)):
        o, vjp = jax.vjp(jax.jit(f), q, k, v)
        grads = jax.jit(vjp)(w)
    o_ref, vjp_ref = jax.vjp(r, q, k, v)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
    for name, g, g_ref in zip("qkv", grads, vjp_ref(w)):
        np.testing.assert_allclose(g, g_ref, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")
    if causal and seg is None:  # causality: later tokens never change earlier outputs
        with jax.set_mesh(_mesh(*mesh)):
            o2 = jax.jit(f)(q, k.at[:, 20:].set(-2.0), v.at[:, 20:].set(3.0))
        np.testing.assert_allclose(o2[:, :20], o[:, :20], atol=1e-6)
        assert float(jnp.abs(o2[:, 20:] - o[:, 20:]).max()) > 1e-2


@pytest.mark.parametrize("n", [1, 2, 8])
def test_zigzag_is_a_permutation_and_its_inverse(n):
    x = jnp.arange(2 * 32).reshape(2, 32)
    perm = context.zigzag_indices(32, n)
    np.testing.assert_array_equal(context.zigzag_reference(x, n), x[:, perm])
    with jax.set_mesh(_mesh(1, n)):
        z = jax.jit(context.zigzag)(x)  # the sharded form: ppermutes of half shards
        np.testing.assert_array_equal(z, x[:, perm])
        np.testing.assert_array_equal(jax.jit(context.unzigzag)(z), x)
    if n == 8:
        assert list(perm[:4]) == [0, 1, 30, 31]  # device 0: chunks 0 and 15


def test_unsplittable_length_names_T_and_N():
    q, k, v, _ = _inputs(1, 24, 2, 2)
    with jax.set_mesh(_mesh(1, 8)):
        with pytest.raises(ValueError, match=r"T=24.*N=8"):
            context.attention(q, k, v)
        with pytest.raises(ValueError, match="unknown context-parallel"):
            context.attention(q, k, v, strategy="tree", load_balance=False)
        # The single-device op's own checks and messages (GQA heads, window).
        with pytest.raises(ValueError, match=r"multiple of kv heads.*Hq=3 Hkv=2"):
            context.attention(jnp.zeros((1, 32, 3, 8)), jnp.zeros((1, 32, 2, 8)),
                              jnp.zeros((1, 32, 2, 8)))
        with pytest.raises(ValueError, match="window=0"):
            context.attention(q, k, v, window=0)


def test_load_balance_equalises_visited_key_blocks():
    """Deterministic count of computed (query, key) block pairs per device."""
    T, n = 8192, 8
    lb = context.visited_key_blocks(T, n, causal=True, load_balance=True, block=256)
    flat = context.visited_key_blocks(T, n, causal=True, load_balance=False, block=256)
    mean = np.mean(lb)
    assert max(abs(c - mean) for c in lb) <= 0.1 * mean
    assert sum(lb) == sum(flat)  # the same pairs, only distributed differently
    assert max(flat) / min(flat) > 10  # contiguous: device 7 does 15x device 0's work
    # Invisible blocks are skipped: causal visits about half of all pairs.
    total = (T // 256) ** 2
    assert sum(lb) < 0.6 * total
    win = context.visited_key_blocks(T, n, causal=True, window=512, block=256)
    assert sum(win) <= 3 * (T // 256)  # a window: a band of blocks, not a triangle


# ----------------------------------------------------------------------------
# Sequence-parallel linear attention / delta rule (state passing) vs one device.
# ----------------------------------------------------------------------------

# Per-key gates everywhere (the scalar gate is the case K = 1 of the same code path).
LINEAR_CASES = ["gla_per_key", "kda_reset", "rwkv6", "rwkv7"]


@pytest.mark.slow
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_sequence_parallel_linear_equals_one_device(case):
    from longctx.backends.linear import ops as linear_ops
    from longctx.parallel import context_linear

    B, T, H, K, V = 2, 32, 2, 4, 6
    ks = jax.random.split(jax.random.key(1), 7)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K)) * 0.5
    v = jax.random.normal(ks[2], (B, T, H, V))
    S0 = jax.random.normal(ks[3], (B, H, K, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, K)) + 2)
    if case == "gla_per_key":
        ops, sp = linear_ops.linear_attention, context_linear.linear_attention
        extra = ()
    elif case == "kda_reset":  # KDA with a hard reset (packed documents) in device 1's chunk
        ops, sp = linear_ops.delta_rule, context_linear.delta_rule
        g = g.at[:, 13].set(-jnp.inf)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        extra = (jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))),)
    elif case == "rwkv6":  # (r, k, v, w, u): the gate is positional, the bonus replicated
        u = jax.random.normal(ks[5], (H, K))
        ops = lambda q, k, v, *, g, **kw: linear_ops.rwkv6(q, k, v, g, u, **kw)  # noqa: E731
        sp = lambda q, k, v, *, g, **kw: context_linear.rwkv6(q, k, v, g, u, **kw)  # noqa: E731
        extra = ()
    else:  # rwkv7 (r, w, k, v, a, b), a = -kappa, b = kappa * a_gate
        kap = jax.random.normal(ks[5], (B, T, H, K))
        kap = kap / jnp.linalg.norm(kap, axis=-1, keepdims=True)
        ab = (-kap, kap * jax.nn.sigmoid(jax.random.normal(ks[6], (B, T, H, K))))
        ops = lambda q, k, v, *, g, **kw: linear_ops.rwkv7(q, g, k, v, *ab, **kw)  # noqa: E731
        sp = lambda q, k, v, *, g, **kw: context_linear.rwkv7(q, g, k, v, *ab, **kw)  # noqa
        extra = ()

    def loss(fn):
        def f(S0, q, k, v):
            o, S = fn(q, k, v, *extra, g=g, initial_state=S0, output_final_state=True,
                      chunk_size=4)
            return jnp.sum(o * v[..., :1]) + jnp.sum(S * S0), (o, S)
        return f

    with jax.set_mesh(_mesh(2, 4)):
        (_, (o, S)), grads = jax.jit(jax.value_and_grad(loss(sp), argnums=(0, 1, 2, 3),
                                                        has_aux=True))(S0, q, k, v)
    (_, (o_ref, S_ref)), grads_ref = jax.value_and_grad(loss(ops), argnums=(0, 1, 2, 3),
                                                        has_aux=True)(S0, q, k, v)
    np.testing.assert_allclose(o, o_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(S, S_ref, atol=2e-5, rtol=2e-5)
    for name, a, b in zip(["S0", "q", "k", "v"], grads, grads_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
