"""Token-mixing backends, one package each: ``full``, ``linear``, ``recurrent``.

Each package holds, side by side:

* ``config.py``: its config section (a frozen dataclass that validates itself; no jax),
* ``ops.py`` (and helpers): its functional math, the readable reference beside the
  fast forms (no Flax),
* ``mixer.py``: its Flax NNX token mixer (the state protocol of
  :mod:`longctx.backends.base`).

Package ``__init__`` files import nothing, so that ``longctx.config`` can read the
sections without importing jax. The registry of mixers (backend name -> class) is
``longctx.model.registry.BACKENDS``; the public functional namespace is
``longctx.ops``.
"""
