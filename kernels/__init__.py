"""Pallas kernels (GPU/TPU), each with its pure-JAX reference beside it; tested in interpret mode.

* ``splash_attention``: JAX's Pallas TPU splash-attention kernels behind the
  contract of ``longctx.backends.full.ops.attention`` (``impl="splash"``).
* ``chunk_grid``: the grid both linear kernels share (batch x heads parallel, chunks
  sequential, the ``[K, V]`` state in VMEM scratch; VMEM independent of length).
* ``linear_attention``: chunked (gated) linear attention, Pallas forward and backward
  kernels (``form="pallas"`` of ``ops.linear_attention``).
* ``delta_rule``: the (gated) delta rule, WY factors in JAX, state recurrence in
  Pallas (``form="pallas"`` of ``ops.delta_rule``).
"""
