"""Pallas kernels (GPU/TPU), each with its pure-JAX reference beside it; tested in interpret mode.

* ``splash_attention``: JAX's Pallas TPU splash-attention kernels behind the
  contract of ``longctx.backends.full.ops.attention`` (``impl="splash"``).
"""
