"""Pallas chunked linear attention and delta rule in interpret mode on CPU vs the recurrent form.

The recurrent form (``lax.scan`` over time, one rank-one update per token) of
``longctx.backends.linear.ops`` is the independent reference: outputs, final
states and every gradient (q, k, v, g, initial state), for each gate type, a
length that is not a multiple of the chunk, and a hard reset (``g = -inf``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.backends.linear import ops
from longctx.kernels import chunk_triton
from longctx.kernels import delta_rule as pk_delta
from longctx.kernels import linear_attention as pk

B, T, H, K, V, C = 1, 40, 2, 8, 6, 16  # T = 2.5 chunks


def _inputs(gate):
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q, k = (jax.random.normal(ks[i], (B, T, H, K)) for i in range(2))
    v = jax.random.normal(ks[2], (B, T, H, V))
    S0 = jax.random.normal(ks[3], (B, H, K, V))
    g = None
    if gate == "scalar":
        g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 2.0)
        g = g.at[0, 21, 1].set(-jnp.inf)  # a hard reset (packed documents)
    elif gate == "per_key":
        g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, K)) + 1.0)
        g = g.at[0, 21, 1, 3].set(-jnp.inf)  # a hard reset of one key's row
    return q, k, v, g, S0


def _value_and_grads(fn, q, k, v, g, S0, **kw):
    def loss(q, k, v, g, S0):
        o, S = fn(q, k, v, g=g, initial_state=S0, output_final_state=True, **kw)
        return jnp.sum(o * jnp.sin(o)) + jnp.sum(S * jnp.cos(S)), (o, S)

    argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, g, S0)


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["none", "scalar", "per_key"])
def test_pallas_linear_attention_matches_recurrent(gate):
    q, k, v, g, S0 = _inputs(gate)
    (_, (o, S)), grads = _value_and_grads(pk.linear_attention, q, k, v, g, S0,
                                          chunk_size=C, interpret=True, scale=0.5)
    (_, (o_ref, S_ref)), grads_ref = _value_and_grads(ops.linear_attention, q, k, v, g, S0,
                                                      form="recurrent", scale=0.5)
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(S, S_ref, atol=1e-5, rtol=1e-5)
    names = ["q", "k", "v", "S0"] if g is None else ["q", "k", "v", "g", "S0"]
    # every gate type: forward and backward are Pallas kernels
    grad_fn = jax.grad(lambda q: jnp.sum(pk.linear_attention(
        q, k, v, g=g, initial_state=S0, chunk_size=C, interpret=True)[0]))
    assert str(jax.make_jaxpr(grad_fn)(q)).count("pallas_call") == 2
    for name, a, b in zip(names, grads, grads_ref):
        assert np.isfinite(np.asarray(a)).all(), name
        # float32 sums of up to 40 rank-one terms of size ~10: rounding ~1e-4 relative
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3, err_msg=f"d{name}")


def test_pallas_linear_attention_is_causal_and_dispatched():
    """Perturbing token t changes no earlier output; form='pallas' reaches the kernel and
    is an error (naming the backend) where no GPU/TPU runs it."""
    q, k, v, g, _ = _inputs("per_key")
    f = jax.jit(lambda k, v: pk.linear_attention(q, k, v, g=g, chunk_size=C,
                                                 interpret=True)[0])
    o, o2 = f(k, v), f(k.at[:, 25].add(1.0), v.at[:, 25].add(1.0))
    np.testing.assert_array_equal(o[:, :25], o2[:, :25])
    assert not np.allclose(o[:, 25:], o2[:, 25:])
    if not pk.available():
        with pytest.raises(ValueError, match=f"target platform is '{jax.default_backend()}'"):
            ops.linear_attention(q, k, v, g=g, form="pallas")
    with pytest.raises(ValueError, match="no normalize"):
        ops.linear_attention(q, k, v, form="pallas", normalize=True)


@pytest.mark.parametrize("gate", ["scalar", "per_key"])  # g=None: the same kernel, b = 0
def test_pallas_delta_rule_matches_recurrent(gate):
    """Gated DeltaNet (scalar gate with a hard reset) and KDA (per-key gate)."""
    q, k, v, g, S0 = _inputs(gate)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # as the layer does
    beta = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(7), (B, T, H)))

    def run(fn, **kw):
        def loss(q, k, v, beta, g, S0):
            o, S = fn(q, k, v, beta, g=g, initial_state=S0, output_final_state=True, **kw)
            return jnp.sum(o * jnp.sin(o)) + jnp.sum(S * jnp.cos(S)), (o, S)

        argnums = (0, 1, 2, 3, 5) if g is None else (0, 1, 2, 3, 4, 5)
        return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(
            q, k, v, beta, g, S0)

    (_, (o, S)), grads = run(pk_delta.delta_rule, chunk_size=C, interpret=True)
    (_, (o_ref, S_ref)), grads_ref = run(ops.delta_rule, form="recurrent")
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(S, S_ref, atol=1e-5, rtol=1e-5)
    names = ["q", "k", "v", "beta", "S0"] if g is None else ["q", "k", "v", "beta", "g", "S0"]
    for name, a, b in zip(names, grads, grads_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
    grad_fn = jax.grad(lambda q: jnp.sum(pk_delta.delta_rule(
        q, k, v, beta, g=g, initial_state=S0, chunk_size=C, interpret=True)[0]))
    assert str(jax.make_jaxpr(grad_fn)(q)).count("pallas_call") == 2  # forward, backward
    if not pk.available():
        with pytest.raises(ValueError, match=f"target platform is '{jax.default_backend()}'"):
            ops.delta_rule(q, k, v, beta, g=g, form="pallas")


def _kernel_and_reference(op, gate):
    """The Pallas op (``"linear"`` / ``"delta"``), the pure-JAX op it must match, and their
    inputs (for the delta rule: unit keys and a fixed beta, closed over)."""
    q, k, v, g, S0 = _inputs(gate)
    if op == "linear":
        return pk.linear_attention, ops.linear_attention, (q, k, v, g, S0)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(7), (B, T, H)))
    fn = lambda *a, **kw: pk_delta.delta_rule(*a[:3], beta, *a[3:], **kw)  # noqa: E731
    ref = lambda *a, **kw: ops.delta_rule(*a[:3], beta, *a[3:], **kw)  # noqa: E731
    return fn, ref, (q, k, v, g, S0)


@pytest.mark.parametrize("op,gate,group", [("linear", "scalar", 2), ("delta", "per_key", 2),
                                           ("linear", "none", 3)])
def test_pallas_backward_recomputes_chunk_states_in_groups(op, gate, group):
    """The backward saves one state per group of chunks and recomputes the rest on chip: with
    2 chunks per group over 3 chunks (a short last group) and 3 (one group), values and
    gradients match the recurrent form."""
    fn, ref, (q, k, v, g, S0) = _kernel_and_reference(op, gate)
    (_, (o, S)), grads = _value_and_grads(fn, q, k, v, g, S0, chunk_size=C, interpret=True,
                                          group=group)
    (_, (o_ref, S_ref)), grads_ref = _value_and_grads(ref, q, k, v, g, S0, form="recurrent")
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(S, S_ref, atol=1e-5, rtol=1e-5)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3, err_msg=f"grad {i}")


@pytest.mark.parametrize("op,gate,group,v_tile", [
    ("linear", "scalar", None, None), ("linear", "none", 2, 2), ("delta", "scalar", 2, None),
    ("delta", "per_key", None, 2),
    pytest.param("linear", "per_key", 2, 2, marks=pytest.mark.slow)])
def test_pallas_triton_walker_matches_recurrent(op, gate, group, v_tile, monkeypatch):
    """The GPU walker (one program per row and V tile, a loop over chunks, the backward
    recomputing a chunk's start state from its group's and summing the key-side gradients
    over V tiles) on the same chunk math, in interpret mode; ``v_tile=2``: V = 6 in 3 tiles."""
    if v_tile:  # (on GPU the tile is at least 16: tt.dot)
        monkeypatch.setattr(chunk_triton, "v_tile", lambda K, V: v_tile)
    fn, ref, (q, k, v, g, S0) = _kernel_and_reference(op, gate)
    (_, (o, S)), grads = _value_and_grads(fn, q, k, v, g, S0, chunk_size=C, interpret=True,
                                          group=group, backend="triton")
    (_, (o_ref, S_ref)), grads_ref = _value_and_grads(ref, q, k, v, g, S0, form="recurrent")
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(S, S_ref, atol=1e-5, rtol=1e-5)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3, err_msg=f"grad {i}")
    with pytest.raises(ValueError, match="backend='cuda' must be one of"):
        pk.linear_attention(q, k, v, interpret=True, backend="cuda")


@pytest.mark.parametrize("op,gate", [("linear", "scalar"), ("delta", "per_key")])
def test_pallas_slabs_match_recurrent(op, gate):
    """A long sequence runs in slabs (a scan over slabs of 16 tokens, each a checkpoint,
    the state carried; T = 40: two slabs and a tail of 8): values and every gradient
    (initial state included) match the recurrent form."""
    fn, ref, (q, k, v, g, S0) = _kernel_and_reference(op, gate)
    (_, (o, S)), grads = _value_and_grads(fn, q, k, v, g, S0, chunk_size=8, interpret=True,
                                          slab=16)
    (_, (o_ref, S_ref)), grads_ref = _value_and_grads(ref, q, k, v, g, S0, form="recurrent")
    np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(S, S_ref, atol=1e-5, rtol=1e-5)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3, err_msg=f"grad {i}")
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(fn(
        q, k, v, g=g, chunk_size=8, interpret=True, slab=16)[0])))(q))
    assert "scan" in jaxpr and jaxpr.count("pallas_call") >= 4  # slabs: scan and tail


def test_pallas_slab_length():
    """Auto: the longest power of two whose float32 [B*H, slab, max(K, V, 128)] array is
    within SLAB_BYTES (a multiple of the chunk), never beyond T; explicit slabs must tile
    chunks."""
    assert pk.slab_of(None, 1, 1 << 20, 8, 256, 256, 64) == pk.SLAB_BYTES // (4 * 8 * 256)
    assert pk.slab_of(None, 1, 1 << 20, 8, 64, 64, 64) == pk.SLAB_BYTES // (4 * 8 * 128)
    assert pk.slab_of(None, 1, 4096, 8, 256, 256, 64) == 4096
    assert pk.slab_of(0, 1, 1 << 20, 8, 256, 256, 64) == 1 << 20
    with pytest.raises(ValueError, match="slab=24 must be None, 0"):
        pk.slab_of(24, 1, 1024, 8, 64, 64, 16)


def test_bench_kernels_timing_rows_run_on_cpu(capsys):
    """The bench's timed path (`python -m experiments.bench_kernels`, no --target) runs end
    to end on CPU: each linear kernel's row in interpret mode, labelled as not a speed
    measurement (its fwd+bwd builder once shadowed by the compile table's broke it)."""
    from experiments import bench_kernels

    bench_kernels.main(["--lengths", "32", "--repeats", "1", "--heads", "1", "--only", "linear"])
    rows = [r for r in capsys.readouterr().out.splitlines() if "pallas vs chunk" in r]
    assert len(rows) == 4 and all("INTERPRET MODE" in r for r in rows), rows
