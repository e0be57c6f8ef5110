"""Inheritance: a child model starts from a chosen fraction of a parent's knowledge.

* ``core.py``: :func:`~longctx.inherit.core.inherit` (exported as ``longctx.inherit``), the
  parameter correspondence table, and :func:`~longctx.inherit.core.upcycle` (dense -> MoE);
* ``distill_config.py``: the ``distill`` config section (distillation from a parent in the
  trainer; no jax);
* ``__main__.py``: ``python -m longctx.inherit --parent RUN --config CHILD.yaml --ratio R
  --method M --run-dir OUT``.

This ``__init__`` imports nothing, so that ``longctx.config`` reads the section without
importing jax (as the backends' and the MoE's packages).
"""
