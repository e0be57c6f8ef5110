"""FLOPs, MFU, memory and timing helpers shared by the trainer and the benchmarks.

FLOPs (DESIGN.md "Measuring"): ``6 · N · tokens`` for the matmuls, with N the
active non-embedding parameters, plus 3× (forward + backward) the mixing FLOPs
that each layer's mixer reports for the sequence (``mixing_flops``: causal
softmax pairs, the chunked linear form, segment attention over the XL ring and
the memories), so MFU is counted alike for every backend and hybrid pattern. MFU divides the
achieved rate by the device's peak: a table for GPUs / TPUs, and on CPU a float32
matmul rate measured on this machine (printed beside it, since CPUs have no
meaningful datasheet peak for XLA).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp

from longctx import targets


def median_time(fn, *args, repeats=3, warmup=1):
    """Median wall time of ``fn(*args)`` (blocking on the result) after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loglog_slope(points) -> float:
    """Least-squares slope of ``log y`` against ``log x`` over ``(x, y)`` points (1: linear)."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
            / sum((x - mx) ** 2 for x in xs))


def append_jsonl(path: str | None, rows) -> None:
    """Append ``rows`` (dicts) to a JSON-lines file; nothing when ``path`` is None."""
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


@functools.cache
def matmul_rate(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of the default device (once per process).

    ``n = 1024`` is large enough to reach the BLAS rate on a CPU and costs ~8x less than
    2048 (every training run measures it once when the device has no datasheet peak).
    """
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    return 2 * n**3 / median_time(jax.jit(jnp.matmul), a, b, repeats=repeats)


def peak_flops() -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from)."""
    kind = jax.devices()[0].device_kind
    chip = targets.chip_of_kind(kind)  # the one table of peaks (longctx/targets.py)
    if chip is not None:
        return chip.peak_flops, f"datasheet bf16 peak of {kind}"
    return matmul_rate(), f"measured float32 1024^3 matmul rate on {kind}"


def scratch_bytes(jitted, *args) -> int:
    """Compiled temporary memory of ``jitted(*args)`` (deterministic on CPU)."""
    return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes


def active_params(model_cfg, params) -> tuple[int, int]:
    """(all parameters, active non-embedding parameters) of an ``nnx.State`` of Params.

    Active: a token runs through ``num_experts_per_tok`` of the ``num_experts``
    experts of an MoE layer, so parameters with an ``expert`` logical axis count
    ``k / E`` of their size. Embeddings (and an untied head) are excluded, as in
    the ``6·N·tokens`` rule.
    """
    from flax import nnx

    total = active = 0
    moe = model_cfg.moe
    for _, v in nnx.to_flat_state(params):
        size = math.prod(v.get_value().shape)
        total += size
        axes = v.get_metadata().get("out_sharding") or ()
        if "vocab" in axes:
            continue
        if "expert" in axes and moe.num_experts:
            size = size * moe.num_experts_per_tok // moe.num_experts
        active += size
    return total, active


def train_flops_per_step(model, n_active_params: int, *, batch: int, seq_len: int) -> float:
    """FLOPs of one training step (forward + backward) of ``model`` on ``[batch, seq_len]``.

    ``6 · N · tokens`` (``tokens`` includes what the model adds, e.g. memory tokens)
    plus ``3 ×`` the mixers' forward mixing FLOPs. ``model`` may be abstract
    (``nnx.eval_shape``): only its configuration is read.
    """
    tokens = batch * model.tokens_processed(seq_len)
    return 6.0 * n_active_params * tokens + 3.0 * model.mixing_flops(batch, seq_len)


def device_peak_memory() -> int | None:
    """Peak bytes in use on device 0 where the runtime reports it (GPU/TPU), else None."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")
