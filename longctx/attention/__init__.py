"""Token-mixing math. ``full``: exact attention kernels. ``registry``: backend name -> mixer.

The functional kernels here know nothing of Flax; the Flax mixers live in
``longctx.model.mixers`` and are looked up through ``registry.BACKENDS``.
"""

from longctx.attention import full

__all__ = ["full"]
