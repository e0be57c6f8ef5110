"""The Pallas linear-attention and delta-rule kernels compile for a real TPU (Mosaic).

Compile-only TPU v5p devices (libtpu, the ``tpu`` extra) on this CPU machine: each
kernel's forward and backward through the public ``longctx.ops`` (``form="pallas"``)
under ``jax.set_mesh``, at T = 32768, and the program must hold the Mosaic custom calls
(no silent fallback to another form). The TPU compiler checks VMEM for real, so a
kernel whose blocks do not fit fails here. ``g=None`` runs the scalar-gate kernel with a
zero gate, so the scalar case covers it. Small B and H: the sequence is what the grid
tiles. Skipped where libtpu is not installed.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_kernels
from longctx import ops, targets
from longctx.compile import custom_calls
from longctx.kernels import linear_attention as pk

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")

B, H, K = 1, 1, 128


def _compile(op, gate, T, dtype=jnp.bfloat16, *, heads=H, compiled=False):
    devs = targets.devices(targets.parse("v5p-8"))
    mesh = jax.make_mesh((1,), ("x",), devices=devs[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    step, args = bench_kernels.fwd_bwd(op, gate, T, K, dtype, mesh, heads=heads, batch=B)
    with jax.set_mesh(mesh):
        assert targets.platform() == "tpu"
        f = step.lower(*args).compile()
        return f if compiled else f.as_text()


@needs_libtpu
@pytest.mark.parametrize("op", ["linear_attention", "delta_rule"])
@pytest.mark.parametrize("gate", ["scalar", "per_key"])
def test_pallas_kernels_compile_for_tpu(op, gate):
    hlo = _compile(op, gate, 32768)
    calls = custom_calls(hlo)
    mosaic = {name: n for name, n in calls.items() if name.startswith("tpu_custom_call")}
    assert sum(mosaic.values()) == 2, calls  # the forward kernel and the backward kernel
    kernels = bench_kernels.mosaic_kernels(hlo)
    assert sorted(kernels) == sorted(bench_kernels.MOSAIC_KERNELS), kernels
    assert max(u for u, _ in kernels.values()) < 8 * 2**20, kernels  # a chunk's blocks, not T's


@needs_libtpu
def test_pallas_kernel_vmem_is_flat_in_length():
    """The VMEM the compiler allots does not follow T (the grid tiles the sequence): from
    8K to 1M tokens (128x) it stays within 1.5x (the compiler's own choices vary a
    little with the grid's extent) and under 2 MiB."""
    short, long = (bench_kernels.mosaic_kernels(
        _compile("linear_attention", "scalar", T, jnp.float32)) for T in (8192, 1 << 20))
    assert sorted(short) == sorted(long) == sorted(bench_kernels.MOSAIC_KERNELS), (short, long)
    assert all(long[k][0] < 2 * 2**20 and long[k][0] <= 1.5 * short[k][0] for k in short), \
        (short, long)


@needs_libtpu
def test_pallas_chunk_must_tile_for_mosaic():
    """A chunk Mosaic cannot tile (float32 rows in multiples of 8) is an error naming it."""
    devs = targets.devices(targets.parse("v5p-8"))
    mesh = jax.make_mesh((1,), ("x",), devices=devs[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    q = jax.ShapeDtypeStruct((B, 96, H, K), jnp.float32)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="chunk_size=12"):
        jax.jit(lambda q: ops.linear_attention(q, q, q, chunk_size=12, form="pallas")).lower(q)


@needs_libtpu
def test_pallas_kernel_hbm_is_a_small_multiple_of_the_inputs():
    """At a long T the fwd+bwd program's HBM temporaries are bounded by what the design keeps
    (bf16, head_dim 128, T = 256K, 8 heads; Q = the bytes of one of q, k, v):

    * q, k, v in the kernels' layout ``[B*H, T, K]``, in their own dtype: ``3 Q``;
    * their gradients, same layout and dtype: ``3 Q``;
    * ``o`` and its cotangent: ``2 Q``;
    * the saved chunk start states, at most half the bytes of q, k, v (``group_of``):
      ``1.5 Q``;
    * the packed scalar gates (two float32 per token and head) and their gradient: ``12 B T H``.

    The old kernels exceeded it alone with float32 copies of q, k, v and of their gradients
    (``12 Q``) and a saved state per chunk (``K V 4 / C`` bytes per token and head: ``4 Q``)."""
    T, heads = 1 << 18, 8
    compiled = _compile("linear_attention", "scalar", T, jnp.bfloat16, heads=heads,
                        compiled=True)
    Q = B * T * heads * K * 2
    bound = (3 + 3 + 2 + 1.5) * Q + 12 * B * T * heads
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= bound, (temp / Q, bound / Q)


@needs_libtpu
def test_pallas_slabs_keep_hbm_flat_beyond_a_slab():
    """Past a slab (``SLAB_BYTES``: 16K tokens at 8 heads of head_dim 128) the program grows
    by what the sequence itself needs, ``o`` and its cotangent (``2 Q`` per 256K tokens, Q
    the bytes of one of q, k, v), not by whole-sequence copies: each slab is sliced in the
    inputs' own layout (a layout constraint), so XLA cannot hoist the kernels' ``[B*H, T,
    K]`` transposes out of the slab loop into copies of all of q, k, v and the gates
    (measured: 4 Q per 256K tokens without the constraint, 1 Q with it)."""
    T, heads = 1 << 18, 8
    assert pk.slab_of(None, B, T, heads, K, K, 16) < T
    temps = [_compile("linear_attention", "per_key", t, jnp.bfloat16, heads=heads,
                      compiled=True).memory_analysis().temp_size_in_bytes for t in (T, 2 * T)]
    Q = B * T * heads * K * 2
    assert temps[1] - temps[0] <= 2 * Q, [t / Q for t in temps]
