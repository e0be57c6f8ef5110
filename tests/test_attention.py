"""Exact attention: flash and the reference against jax.nn.dot_product_attention.

The ladder: jax.nn.dot_product_attention (an independent implementation) is the
oracle for outputs and for the gradients of q, k and v; a naive per-query loop
written here covers what it cannot express (bottom-right alignment with S > T).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.backends.full import ops as full

ATOL = 2e-5


def _rand(shape, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _oracle(q, k, v, *, causal, window, segment_ids):
    """jax.nn.dot_product_attention with the same masking semantics."""
    local = None if window is None else (window - 1, 0 if causal else window - 1)
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        local_window_size=local)


def _segments(B, T, seed):
    """Random document boundaries: ids non-decreasing along time, as in packing."""
    rng = np.random.default_rng(seed)
    starts = rng.random((B, T)) < 0.08
    starts[:, 0] = False
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


CASES = [  # (B, T, Hq, Hkv, D, causal, window, segments, block_q, block_k)
    (2, 100, 4, 4, 16, True, None, False, 32, 16),
    (1, 77, 4, 2, 16, True, None, False, 16, 32),  # GQA, odd length
    (2, 63, 6, 1, 8, True, None, False, 16, 16),  # MQA
    (2, 100, 4, 4, 16, False, None, False, 32, 32),  # bidirectional
    (1, 90, 4, 2, 16, True, 10, False, 16, 16),  # sliding window
    (1, 90, 2, 2, 16, False, 7, False, 16, 16),  # symmetric band
    (2, 96, 4, 2, 16, True, None, True, 16, 32),  # packed documents
    (1, 70, 2, 1, 16, True, 12, True, 16, 16),  # everything at once
    (1, 33, 2, 2, 32, True, None, False, 512, 512),  # shorter than one block
]


def _id(c):
    B, T, Hq, Hkv, D, causal, window, seg, bq, bk = c
    return (f"B{B}-T{T}-Hq{Hq}-Hkv{Hkv}-D{D}-{'causal' if causal else 'bidir'}"
            f"-w{window}-{'seg' if seg else 'noseg'}-bq{bq}-bk{bk}")


@pytest.mark.parametrize("impl", ["flash", "xla"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_dot_product_attention(case, impl):
    B, T, Hq, Hkv, D, causal, window, seg, bq, bk = case
    q, k, v = _rand((B, T, Hq, D), 1), _rand((B, T, Hkv, D), 2), _rand((B, T, Hkv, D), 3)
    segment_ids = _segments(B, T, 4) if seg else None
    ours = lambda q, k, v: full.attention(q, k, v, causal=causal, window=window,  # noqa: E731
                                          segment_ids=segment_ids, impl=impl,
                                          block_q=bq, block_k=bk)
    ref = lambda q, k, v: _oracle(q, k, v, causal=causal, window=window,  # noqa: E731
                                  segment_ids=segment_ids)
    w = _rand((B, T, Hq, D), 5)  # output cotangent: every output weighted differently
    o_ours, g_ours = _out_and_grads(ours, q, k, v, w)
    o_ref, g_ref = _out_and_grads(ref, q, k, v, w)
    np.testing.assert_allclose(o_ours, o_ref, atol=ATOL)
    for name, a, b in zip("qkv", g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=5e-5, err_msg=f"d{name}")


def _out_and_grads(f, q, k, v, w):
    """Output and the vjp of q, k, v for cotangent w, in one compiled call."""

    @jax.jit
    def run(q, k, v, w):
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(w)

    return run(q, k, v, w)


def _naive(q, k, v, *, causal, scale):
    """Per-query loop: query i sits at position i + S - T (bottom-right aligned)."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = np.zeros(q.shape, np.float64)
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    for b in range(B):
        for h in range(Hq):
            for i in range(T):
                n = i + S - T + 1 if causal else S
                s = q[b, i, h] @ k[b, :n, h // G].T * scale
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, :n, h // G]
    return out


@pytest.mark.parametrize("impl", ["flash", "xla"])
@pytest.mark.parametrize("causal", [True, False])
def test_more_keys_than_queries_bottom_right(impl, causal):
    q, k, v = _rand((1, 20, 4, 8), 1), _rand((1, 45, 2, 8), 2), _rand((1, 45, 2, 8), 3)
    o = full.attention(q, k, v, causal=causal, scale=0.3, impl=impl, block_q=8, block_k=16)
    np.testing.assert_allclose(o, _naive(q, k, v, causal=causal, scale=0.3), atol=1e-5)


def test_flash_gradient_more_keys_than_queries():
    q, k, v = _rand((1, 20, 2, 8), 1), _rand((1, 45, 2, 8), 2), _rand((1, 45, 2, 8), 3)
    f = lambda impl: jax.grad(  # noqa: E731
        lambda *a: jnp.sum(jnp.sin(full.attention(*a, impl=impl, block_q=8, block_k=8))),
        argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(f("flash"), f("xla")):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    q, k, v = (_rand((1, 300, 2, 32), i).astype(jnp.bfloat16) for i in range(3))
    o = full.attention(q, k, v, impl="flash", block_q=64, block_k=64)
    assert o.dtype == jnp.bfloat16
    ref = _oracle(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True, window=None,
                  segment_ids=None)
    np.testing.assert_allclose(o.astype(jnp.float32), ref, atol=3e-2)


def test_masked_blocks_stay_finite():
    """Blocks that are entirely masked for some rows (segment boundaries inside a block,
    padding) must not produce NaN in the output or its gradient."""
    q, k, v = _rand((1, 8, 1, 8), 1), _rand((1, 8, 1, 8), 2), _rand((1, 8, 1, 8), 3)
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 2]], jnp.int32)
    for impl in ("flash", "xla"):
        o = full.attention(q, k, v, segment_ids=seg, impl=impl, block_q=4, block_k=4)
        g = jax.grad(lambda q: full.attention(q, k, v, segment_ids=seg, impl=impl,
                                              block_q=4, block_k=4).sum())(q)
        assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("causal,window,expected", [
    (True, None, [[0, 1], [0, 2], [0, 3], [0, 4]]),  # the diagonal and below: 10 of 16 blocks
    (False, None, [[0, 4]] * 4),
    (True, 64, [[0, 1], [0, 2], [1, 3], [2, 4]]),  # a 64-token window spans <= 2 blocks
])
def test_flash_visits_only_the_blocks_it_needs(causal, window, expected):
    """Forward: key blocks per query block; backward: query blocks per key block."""
    c = full._Static(causal=causal, window=window, scale=1.0, T=256, S=256, block_q=64,
                     block_k=64)
    got = [[int(x) for x in full._kv_block_range(i, c, 4)] for i in range(4)]
    assert got == expected
    # The backward's ranges are the transpose: key block j is visited by query block i
    # exactly when j is in i's forward range.
    for j in range(4):
        lo, hi = (int(x) for x in full._q_block_range(j, c, 4))
        assert [i for i in range(4) if expected[i][0] <= j < expected[i][1]] == list(range(lo, hi))


def test_flash_scratch_memory_is_linear_in_length():
    def scratch(T):
        q = jax.ShapeDtypeStruct((1, T, 2, 32), jnp.float32)
        f = jax.jit(jax.grad(lambda q, k, v: full.attention(q, k, v, impl="flash",
                                                            block_q=128, block_k=128).sum(),
                             argnums=(0, 1, 2)))
        return f.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    s1, s2, s4 = scratch(1024), scratch(2048), scratch(4096)
    # Linear: doubling the length adds the same amount (no T^2 term).
    assert abs((s4 - s2) - 2 * (s2 - s1)) <= 0.1 * (s4 - s2), (s1, s2, s4)
    assert s4 < 4096 * 4096 * 2 * 4 / 8  # far below one [T, T] score matrix per head


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(impl="fast"), "unknown attention impl 'fast'"),
     (dict(window=0), "window"),
     (dict(segment_ids=jnp.zeros((2, 5), jnp.int32)), "segment_ids must be")],
)
def test_bad_arguments(kwargs, match):
    q = jnp.zeros((2, 8, 4, 8))
    with pytest.raises(ValueError, match=match):
        full.attention(q, q, q, **kwargs)


def test_gqa_head_mismatch_and_cudnn_on_cpu():
    q, k = jnp.zeros((1, 8, 3, 8)), jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="Hq=3 Hkv=2"):
        full.attention(q, k, k)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            full.attention(k, k, k, impl="cudnn")
