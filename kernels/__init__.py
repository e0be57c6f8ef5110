"""Pallas kernels (GPU/TPU), each with its pure-JAX reference beside it.

Empty so far: the pure-JAX flash attention in ``longctx.backends.full.ops`` is the
fast path on every platform until a Pallas kernel beats it here.
"""
