"""Expert-parallel MoE memory: the dispatch buffers are the device's own routed tokens
times the capacity factor (rows of d_model), linear in the local sequence length and
independent of the global batch; the 8-device layer still equals one device
(tests/test_moe.py, section 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.moe import ops as moe
from longctx.parallel import sharding as shd

E, K, D, F, CF = 8, 2, 64, 32, 1.25


def _temp_bytes(n_devices: int, batch: int, seq: int, capacity_factor: float = CF) -> int:
    """Compiled temporary bytes per device of an expert-parallel MoE forward + backward over
    ``n_devices`` (all of them on the expert axis), ``batch`` sequences of ``seq`` tokens."""
    mesh = shd.make_mesh({"expert": n_devices}, devices=jax.devices()[:n_devices])
    rng = np.random.default_rng(0)
    experts = jnp.asarray(np.argsort(rng.normal(size=(batch, seq, E)), -1)[..., :K], jnp.int32)
    x = jax.ShapeDtypeStruct((batch, seq, D), jnp.float32)
    wts = jax.ShapeDtypeStruct((batch, seq, K), jnp.float32)
    w = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(E, D, F), (E, D, F), (E, F, D)]]

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
