"""Chunked cross entropy (train.loss_chunk_size): the loss and every gradient equal the
plain loss on the full logits, and the compiled step never holds [B, T, vocab]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import longctx
from longctx.train.step import loss_fn, segment_value_and_grad

TINY = "experiments/configs/tiny.yaml"
SMALL = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_dim=64",
         "model.n_layers=1"]


def _batch(B, T, V, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"tokens": jax.random.randint(k1, (B, T), 0, V, jnp.int32),
            "targets": jax.random.randint(k2, (B, T), 0, V, jnp.int32),
            "loss_mask": (jax.random.uniform(k3, (B, T)) > 0.2).astype(jnp.float32)}


def test_chunked_loss_in_segments_equals_the_plain_windowed_loss():
    cfg = longctx.load_config(TINY, SMALL + ["model.segment_len=16", "model.bptt_segments=2"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(1))
    batch = _batch(2, 40, 256, 1)
    gdef, state = nnx.split(model)
    denom = batch["loss_mask"].sum()
    run = jax.jit(lambda s, b, c: segment_value_and_grad(gdef, s, b, denom, chunk_size=c),
                  static_argnums=2)
    (l0, _), g0 = run(state, batch, 0)
    (l1, _), g1 = run(state, batch, 6)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_chunked_loss_and_gradients_equal_the_plain_loss_without_the_full_logits():
    """Untied head (its own weight; the segment test above covers the tied one)."""
    V, B, T = 8192, 2, 500  # 500: chunks of 8 leave a padded tail of 4
    flash = ["model.attention.impl=flash", "model.attention.block_q=64",
             "model.attention.block_k=64"]  # attention memory linear in T, out of the way
    cfg = longctx.load_config(TINY, SMALL + flash + [f"model.vocab_size={V}",
                                                     "model.tie_embeddings=false"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(model)
    batch = _batch(B, T, V)
    logits_bytes = B * T * V * 4

    def compiled(chunk):
        def f(s, b):
            return loss_fn(nnx.merge(gdef, s), b, chunk_size=chunk)
        return jax.jit(jax.value_and_grad(f, has_aux=True)).lower(state, batch).compile()

    plain, chunked = compiled(0), compiled(8)
    (l0, m0), g0 = plain(state, batch)
    (l1, m1), g1 = chunked(state, batch)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert float(m1["accuracy"]) == float(m0["accuracy"])
    flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(flat0) == len(flat1) > 5
    for a, b in zip(flat0, flat1):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)
    plain_mem = plain.memory_analysis().temp_size_in_bytes
    chunked_mem = chunked.memory_analysis().temp_size_in_bytes
    assert plain_mem >= logits_bytes  # the reference does hold [B, T, V] (and its gradient)
    # what is left: one chunk's logits, softmax and gradient, the [V, E] weight gradients
    assert chunked_mem < logits_bytes / 4, (chunked_mem, plain_mem, logits_bytes)


def test_chunked_loss_of_a_sequence_sharded_input_stays_on_its_devices():
    """Context parallelism: ``x`` split over `sequence`. The chunks take tokens from every
    shard, so each device computes its own tokens' logits: same loss and gradients as the
    plain loss, and the compiled program holds less than the whole ``x``; contiguous chunks
    (``shards=1``, the counter-example) gather ``x`` onto every device."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from longctx.train.loss import chunked_cross_entropy, cross_entropy

    mesh = jax.make_mesh((4,), ("sequence",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:4])
    B, T, E, V = 1, 4096, 64, 512
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (B, T, E))
    w = jax.random.normal(k[1], (E, V)) * 0.1
    t = jax.random.randint(k[2], (B, T), 0, V)
    m = (jax.random.uniform(k[3], (B, T)) > 0.2).astype(jnp.float32)

    def chunked(x, w, shards):
        return chunked_cross_entropy(lambda xc: xc @ w, x, t, m, chunk_size=256,
                                     shards=shards)[0]

    ref_loss = cross_entropy(x @ w, t, m)[0]
    ref = jax.grad(lambda x, w: cross_entropy(x @ w, t, m)[0], argnums=(0, 1))(x, w)
    temp = {}
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "sequence", None)))
        for shards in (4, 1):
            exe = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)),
                          static_argnums=2).lower(xs, w, shards).compile()
            loss, grads = exe(xs, w)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
            for a, b in zip(grads, ref):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
            temp[shards] = exe.memory_analysis().temp_size_in_bytes
    assert temp[4] < x.nbytes <= temp[1], (temp, x.nbytes)
