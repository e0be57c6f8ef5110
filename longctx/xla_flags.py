"""XLA flags longctx needs, added to ``XLA_FLAGS`` by ``import longctx`` (before JAX's
backends start; XLA reads the variable once, when the first backend is created).

``--xla_cpu_experimental_ynn_fusion_type=-reduce``: XLA:CPU in jaxlib 0.10 hands
reductions, and the elementwise and dot ops around them, to YNNPACK as "reduce"
fusions. In the backward pass of the recurrent backend's compressive-memory read
(``num / (den + eps)`` with ``num = s(Q) M``, ``den = s(Q) z``, fused with the dots
around it into one YNNPACK subgraph) such a fusion returns garbage that changes from
run to run of the *same executable* (a finite, nan or inf first-step gradient norm for
identical inputs), while with this flag (or ``--xla_cpu_experimental_ynn_fusion_type=``, no
YNNPACK fusion at all, or ``individual_dot`` only) every run gives the same value
(reproductions: ``tests/test_recurrent.py``, ``tests/test_determinism.py``; the
investigation: ``docs/results/scaling_length_fwe.md``). Only the reduce fusions are dropped;
YNNPACK still runs the dots.

A flag the user already set (the same name in ``XLA_FLAGS``) is kept as it is: that is
the way to opt out. If JAX's backends are already running when longctx is imported, the
flag cannot take effect and a warning says so.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# name -> value; only for the jaxlib versions they were tested with (an unknown flag in
# XLA_FLAGS is a fatal error in XLA, so a flag never goes to a jaxlib that may lack it).
FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ("-reduce", ("0.10.",))}


def _jaxlib_version() -> str:
    try:
        from jaxlib import version
        return version.__version__
    except ImportError:  # pragma: no cover - jax always brings jaxlib
        return ""


def apply() -> list[str]:
    """Add the missing flags of :data:`FLAGS` to ``XLA_FLAGS``; returns those added."""
    current = os.environ.get("XLA_FLAGS", "")
    ver = _jaxlib_version()
    missing = [f"{name}={value}" for name, (value, versions) in FLAGS.items()
               if name not in current and ver.startswith(versions)]
    if not missing:
        return []
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        log.warning("JAX's backends started before `import longctx`: XLA flags %s (see "
                    "longctx/xla_flags.py) cannot take effect in this process; import "
                    "longctx first or add them to XLA_FLAGS", " ".join(missing))
        return []
    os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
    return missing
