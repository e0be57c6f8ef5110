"""Benchmark: a training step of the `recurrent` backend from 64K to 4M tokens.

    python -m experiments.bench_recurrent                       # 64K, 256K, 1M, 4M; tiny, batch 1
    python -m experiments.bench_recurrent --lengths 65536 262144 --repeats 1
    python -m experiments.bench_recurrent --time-max 1048576    # compile-only (memory) above 1M
    python -m experiments.bench_recurrent --set model.attention.recurrent.knn_size=4096

The step is the trainer's loss and gradients (``segment_value_and_grad``) for
tiny.yaml's model with ``model.attention.backend=recurrent`` (XL cache of one
segment + linear compressive memory by default; ``--set key=value`` overrides):
the loss is reduced inside the segment scan, so nothing of size ``T x vocab``
exists, and truncated BPTT (``--window`` segments, default 4) is run window by
window with the gradients accumulated: the carried state and one window's
working set are all that is kept, and the compiled scratch memory
(``jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``,
deterministic on CPU) should not grow with length. Printed per length: median
fwd+bwd seconds, tokens/s, scratch MiB, and below the table the scratch ratio
against the shortest length (target <= 1.3 at 1M) and the log-log slope of time
(target 1.0, linear in length).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import longctx
from longctx.train import segment_value_and_grad

DEFAULTS = ["model.attention.backend=recurrent", "model.segment_len=256",
            "model.attention.recurrent.cache_segments=1",
            "model.attention.recurrent.compressive=linear", "model.max_seq_len=256"]


def make_step(model, window: int):
    """``(state, batch) -> ((loss, metrics), grads)``: the trainer's own windowed path.

    ``longctx.train.step.segment_value_and_grad`` with ``model.bptt_segments = window``:
    a scan over windows of ``window`` segments, each window's gradient taken on its own
    (incoming state under stop-gradient) and summed, each segment's logits reduced to its
    cross entropy at once, so only the carried state and one window's residuals are alive.
    """
    graphdef, state = nnx.split(model)

    def step(state, batch):  # the batch is an argument, as in the trainer (not scratch)
        denom = jnp.asarray(batch["tokens"].size, jnp.float32)
        return segment_value_and_grad(graphdef, state, batch, denom)

    return jax.jit(step), state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[65536, 262144, 1048576, 4194304])
    p.add_argument("--repeats", type=int, default=2,
                   help="timed calls after a warm-up; 0: one call, timed (first-call costs included)")
    p.add_argument("--window", type=int, default=4, help="truncated BPTT: segments per window")
    p.add_argument("--time-max", type=int, default=1 << 30,
                   help="longest length that is also timed (longer: compile + memory only)")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    args = p.parse_args(argv)
    cfg = longctx.load_config("experiments/configs/tiny.yaml",
                              overrides=DEFAULTS + [f"model.bptt_segments={args.window}"] + args.set)
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    step, params = make_step(model, args.window)
    print(f"device {jax.devices()[0].device_kind}; overrides {DEFAULTS + args.set}")
    print(f"{'tokens':>9} {'seconds':>9} {'tok/s':>9} {'scratch MiB':>12}")
    rows = []
    for T in args.lengths:
        tokens = jax.random.randint(jax.random.PRNGKey(0), (1, T), 0, cfg.model.vocab_size)
        tokens = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
                  "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
        scratch = step.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
        secs = float("nan")
        if T <= args.time_max:
            times = []
            for _ in range(args.repeats + 1):  # the first call is a warm-up (timed if alone)
                t0 = time.perf_counter()
                jax.block_until_ready(step(params, tokens))
                times.append(time.perf_counter() - t0)
            secs = statistics.median(times[1:] or times)
        rows.append((T, secs, scratch))
        print(f"{T:>9} {secs:>9.2f} {T / secs:>9.0f} {scratch / 2**20:>12.1f}", flush=True)
    T0, s0, m0 = rows[0]
    for T, s, m in rows[1:]:
        slope = math.log(s / s0) / math.log(T / T0) if s == s and s0 == s0 else float("nan")
        print(f"{T:>9} vs {T0}: scratch x{m / m0:.2f}, time slope {slope:.2f} (1.0 = linear)")


if __name__ == "__main__":
    main()
