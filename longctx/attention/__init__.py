"""Deprecated aliases, kept for one release: the kernels moved to ``longctx.backends``.

``longctx.attention.full`` is ``longctx.backends.full.ops`` and
``longctx.attention.linear`` is ``longctx.backends.linear.ops``; new code uses
``longctx.ops`` (the public functional namespace).
"""
