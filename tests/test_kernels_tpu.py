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
import re

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_kernels
from longctx import ops, targets
from longctx.compile import custom_calls

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")

B, H, K = 1, 1, 128


def _compile(op, gate, T, dtype=jnp.bfloat16, *, heads=H, compiled=False):
    devs = targets.devices(targets.parse("v5p-8"))
    step, args = bench_kernels.fwd_bwd(op, gate, T, K, dtype, heads=heads, batch=B)
    mesh = jax.make_mesh((1,), ("x",), devices=devs[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert targets.platform() == "tpu"
        f = step.lower(*args).compile()
        return f if compiled else f.as_text()


def _vmem_used(hlo):
    """The VMEM each Mosaic kernel of the program uses, as the TPU compiler reports it: the
    end of its used scoped range less the offset XLA placed the kernel's range at."""
    out = []
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        offset = re.search(r'"scoped_memory_configs":\[\{"memory_space":"1","offset":"(\d+)"',
                           line)
        end = re.search(r'"used_scoped_memory_configs":\[\{"memory_space":"1",'
                        r'"offset":"\d+","size":"(\d+)"', line)
        out.append(int(end.group(1)) - int(offset.group(1)))
    return out


@needs_libtpu
@pytest.mark.parametrize("op", ["linear_attention", "delta_rule"])
@pytest.mark.parametrize("gate", ["scalar", "per_key"])
def test_pallas_kernels_compile_for_tpu(op, gate):
    hlo = _compile(op, gate, 32768)
    calls = custom_calls(hlo)
    mosaic = {name: n for name, n in calls.items() if name.startswith("tpu_custom_call")}
    assert sum(mosaic.values()) == 2, calls  # the forward kernel and the backward kernel
    used = _vmem_used(hlo)
    assert len(used) == 2 and max(used) < 8 * 2**20, used  # one chunk's blocks, not T's


@needs_libtpu
def test_pallas_kernel_vmem_is_flat_in_length():
    """The VMEM the compiler allots does not follow T (the grid tiles the sequence): from
    8K to 1M tokens (128x) it stays within 1.5x (the compiler's own choices vary a
    little with the grid's extent) and under 2 MiB."""
    short, long = (_vmem_used(_compile("linear_attention", "scalar", T, jnp.float32))
                   for T in (8192, 1 << 20))
    assert len(short) == len(long) == 2, (short, long)
    assert max(long) < 2 * 2**20 and all(b <= 1.5 * a for a, b in zip(short, long)), (short, long)


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
