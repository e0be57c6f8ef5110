"""Tests run on CPU with 8 simulated devices (set before JAX starts).

Compilation dominates this suite (hundreds of small programs on 2 cores), and many tests
compile the very same program: the trainer's step for the tiny config in every trainer
test, a resumed run and its uninterrupted twin, CLI subprocesses. JAX's persistent
compilation cache, keyed by the program's hash (plus devices, flags and versions), lets
each be compiled once per run and shared by both pytest-xdist workers and by the
subprocesses the tests start (they inherit these variables). It changes no result: a
cache hit is the same executable. It lives in ``.jax_cache/`` at the repository root
(git-ignored; a clean checkout starts cold, a local rerun starts warm; delete it when
it grows: one run writes ~60 MB). It is deliberately unbounded: with a size cap JAX lists
and stats every entry on every write, quadratic in the ~8000 programs of one run (minutes).
Set ``JAX_COMPILATION_CACHE_DIR`` to override it.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# LLVM at -O0 for XLA:CPU's generated code: the suite's programs are tiny, so compiling them
# (not running them) is its cost, and -O0 shortens that compile while the HLO-level
# optimisations (fusion, layout, YNNPACK dots) still run as in production. No result depends on it: there is no fast-math
# either way, and every comparison in the suite is made within one process (one setting).
# A user's own XLA_FLAGS setting of it wins (XLA takes the last occurrence).
os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                           + os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
