"""MoE dispatch memory on a mesh: the buffers hold the device's own routed tokens, never
the global batch's. Expert parallel: the device's token-slots times the capacity factor
(rows of d_model), linear in the local sequence length; dropless without expert
parallelism: the device's own token-slots (sorted locally, weights gathered). The
sharded layers equal one device (here and tests/test_moe.py, section 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from longctx.config import MoEConfig
from longctx.moe import ops as moe
from longctx.moe.layer import MoE
from longctx.parallel import sharding as shd

E, K, D, F, CF = 8, 2, 64, 32, 1.25


def _routing(batch: int, seq: int):
    """Fixed top-K expert choices ``[batch, seq, K]`` and the abstract tokens, routing
    weights and expert weights of a forward + backward."""
    rng = np.random.default_rng(0)
    experts = jnp.asarray(np.argsort(rng.normal(size=(batch, seq, E)), -1)[..., :K], jnp.int32)
    x = jax.ShapeDtypeStruct((batch, seq, D), jnp.float32)
    wts = jax.ShapeDtypeStruct((batch, seq, K), jnp.float32)
    w = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(E, D, F), (E, D, F), (E, F, D)]]
    return experts, x, wts, w


def _temp_bytes(n_devices: int, batch: int, seq: int, capacity_factor: float = CF) -> int:
    """Compiled temporary bytes per device of an expert-parallel MoE forward + backward over
    ``n_devices`` (all of them on the expert axis), ``batch`` sequences of ``seq`` tokens."""
    mesh = shd.make_mesh({"expert": n_devices}, devices=jax.devices()[:n_devices])
    experts, x, wts, w = _routing(batch, seq)

    def loss(x, wts, *w):
        y, dropped = moe.expert_parallel_moe(x, experts, wts, *w, capacity_factor=capacity_factor)
        return jnp.sum(y * y) + dropped

    tok = shd.batch_sharding(mesh, shd.DEFAULT_RULES, 3)
    wsh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    with jax.set_mesh(mesh):
        exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)),
                      in_shardings=(tok, tok, wsh, wsh, wsh)).lower(x, wts, *w).compile()
    assert "all-to-all" in exe.as_text()  # the expert-parallel path
    return exe.memory_analysis().temp_size_in_bytes


def test_expert_parallel_buffers_follow_the_devices_tokens_not_the_global_batch():
    # One 256-token sequence per device: 4 devices (1024 tokens) and 8 devices (2048 tokens)
    # ask the same per-device scratch.
    four, eight = _temp_bytes(4, 4, 256), _temp_bytes(8, 8, 256)
    assert abs(eight - four) <= 0.1 * four, (four, eight)
    # The device's routed rows at capacity factor 1.25: 1.25 * 256 * 2 = 640 rows of d_model;
    # the forward + backward keeps a few such buffers, not S * E * C one-hot entries.
    rows = CF * 256 * K
    assert eight <= 16 * rows * D * 4, (eight, rows)


@pytest.mark.slow
def test_expert_parallel_scratch_is_linear_in_the_local_sequence():
    # GShard's one-hot dispatch / combine tensors are [S, E, C] with C ~ S: quadratic.
    short, long = _temp_bytes(8, 8, 256), _temp_bytes(8, 8, 1024)
    assert long <= 4.6 * short, (short, long)


def _dropless_temp_bytes(n_devices: int, batch: int, seq: int, fn) -> int:
    """Temporary bytes per device of a dropless MoE forward + backward, tokens and the
    weights' d_model over ``fsdp = n_devices`` (the parameters' ZeRO-3 sharding)."""
    mesh = shd.make_mesh({"fsdp": n_devices}, devices=jax.devices()[:n_devices])
    experts, x, wts, w = _routing(batch, seq)

    def loss(x, wts, *w):
        y = fn(x, experts, wts, *w)
        return jnp.sum(y * y)

    tok = shd.batch_sharding(mesh, shd.DEFAULT_RULES, 3)
    w_in, w_out = NamedSharding(mesh, P(None, "fsdp")), NamedSharding(mesh, P(None, None, "fsdp"))
    with jax.set_mesh(mesh):
        exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)),
                      in_shardings=(tok, tok, w_in, w_in, w_out)).lower(x, wts, *w).compile()
    return exe.memory_analysis().temp_size_in_bytes


def _gspmd_dropless(x, experts, wts, *w):  # the global sort: what GSPMD made of it
    B, S, _ = x.shape
    return moe.dropless_moe(x.reshape(B * S, D), experts.reshape(B * S, K),
                            wts.reshape(B * S, K), *w, impl="blocks").reshape(x.shape)


def _local_dropless(x, experts, wts, *w):
    return moe.local_dropless_moe(x, experts, wts, *w, impl="blocks")


def test_dropless_sorts_each_devices_own_tokens():
    # One 1024-token sequence per device on 4 and on 8 devices: the same scratch per device
    # (5.9 MB on jax 0.10.2's CPU backend).
    four = _dropless_temp_bytes(4, 4, 1024, _local_dropless)
    eight = _dropless_temp_bytes(8, 8, 1024, _local_dropless)
    assert abs(eight - four) <= 0.1 * four, (four, eight)
    # Left to GSPMD, the sort over the flattened global slots holds the global batch's
    # (8.9 MB on 4 devices, 15.4 MB on 8).
    assert _dropless_temp_bytes(8, 8, 1024, _gspmd_dropless) > 2 * eight


def test_dropless_layer_on_8_devices_equals_one_device():
    cfg = MoEConfig(num_experts=4, num_experts_per_tok=2, expert_dim=32, shared_experts=1,
                    router_z_loss_weight=1.0)
    layer = MoE(16, cfg, mlp_dim=32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x, proj = (jnp.asarray(rng.normal(size=(8, 12, 16)), jnp.float32) for _ in range(2))

    def grads(layer, x):
        def loss(layer, x):
            y, aux = layer(x)
            return jnp.sum(y * proj) + aux["moe_lb_loss"] + aux["moe_z_loss"], aux
        return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)

    (ref, _), (ref_gw, ref_gx) = nnx.jit(grads)(layer, x)
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    graphdef, state = nnx.split(layer)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, shd.state_shardings(state, mesh, shd.DEFAULT_RULES))
        x = jax.device_put(x, shd.batch_sharding(mesh, shd.DEFAULT_RULES, 3))
        step = jax.jit(lambda s, x: grads(nnx.merge(graphdef, s), x)).lower(state, x).compile()
        (got, _), (gw, gx) = step(state, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(gx, ref_gx, atol=1e-6, rtol=1e-4)
    flat = dict(nnx.to_flat_state(gw))
    for path, v in nnx.to_flat_state(ref_gw):
        np.testing.assert_allclose(flat[path][...], v[...], atol=1e-6, rtol=1e-4,
                                   err_msg="/".join(map(str, path)))
