"""Pallas kernels (GPU/TPU), each with its pure-JAX reference beside it; tested in interpret mode.

* ``splash_attention``: JAX's Pallas TPU splash-attention kernels behind the
  contract of ``longctx.backends.full.ops.attention`` (``impl="splash"``).
* ``chunk_grid``: the TPU (Mosaic) walker both linear kernels share (batch x heads
  parallel, chunks sequential, the ``[K, V]`` state in VMEM scratch; VMEM independent of
  length; the backward recomputes chunk start states per group from one saved state).
* ``chunk_triton``: the GPU (Triton) walker of the same chunk math (one program per
  batch row x head, a loop over chunks carrying the state in registers).
* ``linear_attention``: chunked (gated) linear attention, Pallas forward and backward
  kernels (``form="pallas"`` of ``ops.linear_attention``).
* ``delta_rule``: the (gated) delta rule, WY factors in JAX, state recurrence in
  Pallas (``form="pallas"`` of ``ops.delta_rule``).
"""
