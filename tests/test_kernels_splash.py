"""Splash attention (Pallas TPU kernels) in interpret mode on CPU against the reference.

The kernel bodies are JAX's Mosaic kernels run through the Pallas interpreter
(``interpret=True``), so these tests check our wrapper (layout, GQA grouping,
masks, bottom-right offset, padding to the block, segment ids, the shard_map
under a mesh) and the kernels' numerics; not their TPU compilation or speed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from longctx.backends.full import ops as full
from longctx.kernels import splash_attention as splash
from longctx.parallel import sharding as shd


def _rand(shape, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _segments(B, T, seed):
    rng = np.random.default_rng(seed)
    starts = rng.random((B, T)) < 0.05
    starts[:, 0] = False
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


CASES = [  # (B, T, S, Hq, Hkv, D, causal, window, segments)
    (2, 100, 100, 4, 2, 16, True, None, False),  # GQA, T not a multiple of the 128 block
    (1, 200, 200, 3, 1, 16, True, 24, True),  # MQA, window + packed documents, 2 blocks
    # S > T (bottom-right offset), symmetric band: padded keys would be visible if unmasked
    (1, 60, 150, 2, 1, 16, False, 40, False),
]


def _id(c):
    B, T, S, Hq, Hkv, D, causal, window, seg = c
    return (f"B{B}-T{T}-S{S}-Hq{Hq}-Hkv{Hkv}-D{D}-{'causal' if causal else 'bidir'}"
            f"-w{window}-{'seg' if seg else 'noseg'}")


def _out_and_grads(f, q, k, v, w):
    @jax.jit
    def run(q, k, v, w):
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(w)

    return run(q, k, v, w)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_splash_interpret_matches_reference(case):
    B, T, S, Hq, Hkv, D, causal, window, seg = case
    q, k, v = _rand((B, T, Hq, D), 1), _rand((B, S, Hkv, D), 2), _rand((B, S, Hkv, D), 3)
    segment_ids = _segments(B, T, 4) if seg else None
    kw = dict(causal=causal, window=window, segment_ids=segment_ids, scale=0.3)
    ours = lambda q, k, v: splash.splash_attention(  # noqa: E731
        q, k, v, **kw, block_q=128, block_k=128, interpret=True)
    ref = lambda q, k, v: full.reference_attention(q, k, v, **kw)  # noqa: E731
    w = _rand((B, T, Hq, D), 5)
    o, g = _out_and_grads(ours, q, k, v, w)
    o_ref, g_ref = _out_and_grads(ref, q, k, v, w)
    np.testing.assert_allclose(o, o_ref, atol=2e-5)
    for name, a, b in zip("qkv", g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"d{name}")
    if causal and S == T:  # causality: perturbing token t changes no earlier output
        t = T // 2 + 7
        o2, _ = _out_and_grads(ours, q, k.at[:, t].add(1.0), v.at[:, t].add(1.0), w)
        np.testing.assert_array_equal(o[:, :t], o2[:, :t])
        assert not np.allclose(o[:, t:], o2[:, t:])


def test_splash_under_mesh_is_shard_mapped_and_matches():
    """Under a data x tensor mesh the Pallas call runs per shard (shard_map) and equals
    the single-device result."""
    mesh = shd.make_mesh({"data": 2, "tensor": 2, "fsdp": 1, "expert": 1, "sequence": 1},
                         devices=jax.devices()[:4])
    B, T, Hq, Hkv, D = 2, 100, 4, 2, 16
    q, k, v = _rand((B, T, Hq, D), 1), _rand((B, T, Hkv, D), 2), _rand((B, T, Hkv, D), 3)
    seg = _segments(B, T, 7)
    f = lambda q, k, v, s: splash.splash_attention(  # noqa: E731
        q, k, v, segment_ids=s, block_q=128, block_k=128, interpret=True)
    single = jax.jit(f)(q, k, v, seg)
    with jax.set_mesh(mesh):
        sh = NamedSharding(mesh, P("data", None, "tensor", None))
        args = (jax.device_put(q, sh), jax.device_put(k, sh), jax.device_put(v, sh),
                jax.device_put(seg, NamedSharding(mesh, P("data", None))))
        jaxpr = str(jax.make_jaxpr(f)(*args))
        sharded = jax.jit(f)(*args)
    assert "shard_map" in jaxpr
    np.testing.assert_allclose(sharded, single, atol=1e-6)


def test_explicit_splash_off_tpu_is_an_error_and_blocks_are_checked():
    q = jnp.zeros((1, 8, 2, 8))
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match=f"target platform is '{jax.default_backend()}'"):
            full.attention(q, q, q, impl="splash", block_q=128, block_k=128)
    with pytest.raises(ValueError, match="block_k=96 must be a positive multiple of 128"):
        splash.splash_attention(q, q, q, block_q=128, block_k=96, interpret=True)


def test_masks_match_the_reference_convention():
    """The splash masks (causal / local, bottom-right offset) equal full.visible."""
    T, S = 5, 9
    qp, kp = (np.arange(T) + S - T)[:, None], np.arange(S)[None, :]
    for causal, window in [(True, None), (True, 3), (False, 3), (False, None)]:
        m = splash.make_mask(T, S, offset=S - T, causal=causal, window=window)
        want = np.asarray(full.visible(qp, kp, causal=causal, window=window))
        np.testing.assert_array_equal(m[:, :], want, err_msg=f"{causal=} {window=}")
