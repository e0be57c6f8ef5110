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
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# -- markers -----------------------------------------------------------------------------------
# `slow` was chosen by measured duration (python -m pytest -q --durations=0 -n 2 on the 2-core
# CI machine): tests over ~6 s are slow, except the cheapest of each file, so that the developer
# loop `pytest -m "not slow"` still runs every test file. Whole tests carry @pytest.mark.slow;
# the cases below are the slow parameters of tests whose other cases stay in the fast loop.
SLOW_CASES = {
    "test_context_parallel.py::test_matches_dense_outputs_and_gradients": {
        "all_gather-lb0-causal1-WNone-seg0-Hkv4-sp8", "ring-lb0-causal0-W7-seg1-Hkv2-sp4",
        "ring-lb1-causal1-WNone-seg0-Hkv1-sp4"},
    "test_determinism.py::test_the_same_gradient_run_after_run": {
        "gated_deltanet", "hybrid", "moe", "recurrent", "recurrent_knn"},
    "test_hf.py::test_logits_match_transformers": {"llama3", "llama_dynamic", "mixtral",
                                                   "qwen3_moe"},
    "test_model.py::test_no_logit_depends_on_a_later_token": {"flash", "mqa-untied", "segments",
                                                             "segments-bptt"},
    "test_moe.py::test_one_expert_with_k1_equals_a_dense_swiglu": {"dropless"},
    "test_recurrent.py::test_knn_memory_equals_a_numpy_argsort": {"False"},
    "test_recurrent.py::test_xl_window_equals_a_masked_reference": {"0"},
    "test_segment_windows.py::test_segment_windows_equal_the_model_forward": {
        "overrides0", "overrides1", "overrides2", "overrides4"},
    "test_trainer.py::test_packed_documents_never_attend_to_each_other": {"flash"},
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    found = set()
    for item in items:
        name = f"{item.path.name}::{item.originalname}"
        case = getattr(item, "callspec", None) and item.callspec.id
        if case in SLOW_CASES.get(name, ()):
            item.add_marker(pytest.mark.slow)
            found.add((name, case))
    # A listed case of a collected test that no longer exists (renamed parameters) is an error,
    # so that the list cannot silently stop marking anything.
    collected = {f"{item.path.name}::{item.originalname}" for item in items}
    stale = {(n, c) for n, cases in SLOW_CASES.items() for c in cases
             if n in collected and (n, c) not in found}
    if stale:
        raise pytest.UsageError(f"SLOW_CASES names cases that do not exist: {sorted(stale)}")
