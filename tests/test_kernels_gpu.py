"""The Pallas linear-attention and delta-rule kernels compile for a real GPU (Triton).

Compile-only H100 devices (the CUDA plugin, the ``gpu`` extra, and
``longctx.gpu_targets``) on this CPU machine: each kernel's forward and backward through
the public ``longctx.ops`` (``form="pallas"``) under ``jax.set_mesh``, and the program
must hold the two Pallas Triton calls of the chunk walker (``chunk_fwd_triton``,
``chunk_bwd_triton``): no silent fallback to another form. XLA compiles the Triton IR
to ``sm_90a`` code, so a kernel Triton cannot lower fails here. Skipped where the CUDA
plugin is not installed (the numerics of the Triton walker are tested in interpret mode in
``tests/test_kernels_linear.py``).
"""

import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_kernels
from longctx import ops, targets
from longctx.kernels import linear_attention as pk

needs_cuda = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                reason="CUDA plugin not installed (pip install -e '.[gpu]')")

B, H, K = 1, 2, 64


def _triton_kernels(op, gate, T):
    devs = targets.devices(targets.parse("h100"))
    mesh = jax.make_mesh((1,), ("x",), devices=devs[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    step, args = bench_kernels.fwd_bwd(op, gate, T, K, jnp.bfloat16, mesh, heads=H, batch=B)
    with jax.set_mesh(mesh):
        assert targets.platform() == "gpu"
        hlo = step.lower(*args).compile().as_text()
    return sorted(re.search(r'name = "([^"]+)"', line).group(1) for line in hlo.splitlines()
                  if 'custom_call_target="__gpu$xla.gpu.triton"' in line)


@needs_cuda
@pytest.mark.parametrize("op,gate", [
    ("linear_attention", "scalar"),
    pytest.param("linear_attention", "per_key", marks=pytest.mark.slow),
    pytest.param("delta_rule", "scalar", marks=pytest.mark.slow),
    pytest.param("delta_rule", "per_key", marks=pytest.mark.slow)])
def test_pallas_kernels_compile_for_h100(op, gate):
    assert _triton_kernels(op, gate, 4096) == ["chunk_bwd_triton", "chunk_fwd_triton"]


@needs_cuda
def test_pallas_gpu_shapes_must_be_powers_of_two():
    """Triton's blocks are powers of two: a chunk that is not is an error naming it."""
    devs = targets.devices(targets.parse("h100"))
    mesh = jax.make_mesh((1,), ("x",), devices=devs[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    q = jax.ShapeDtypeStruct((B, 96, H, K), jnp.float32)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="powers of two >= 16"):
        jax.jit(lambda q: ops.linear_attention(q, q, q, chunk_size=48, form="pallas")).lower(q)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="backend='mosaic' compiles for TPU"):
        jax.jit(lambda q: pk.linear_attention(q, q, q, backend="mosaic")).lower(q)
