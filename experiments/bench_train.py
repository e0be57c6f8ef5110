"""Benchmark: achieved FLOP rate of one training step vs the measured matmul rate.

    python -m experiments.bench_train                       # d_model 512, 8 layers, 2K context
    python -m experiments.bench_train --seq-len 1024 --batch 1 model.n_layers=2

Builds the trainer's own jitted step (``longctx.train.step.make_train_step``) on
one device, times it (median after warm-up) and divides the model FLOPs
(``6·N·tokens`` + causal attention, ``longctx.train.metrics``) by the time. The
ratio against a float32 matmul rate measured in the same run is the CPU's MFU.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.config import load_config
from longctx.model import build_model
from longctx.train import metrics as M
from longctx.train import make_optimizer, make_train_step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/configs/base.yaml")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.n_layers=4")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"data.seq_len={args.seq_len}", "data.task=copy",
                                    *args.overrides])
    mc = cfg.model
    model = build_model(mc, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(cfg.optim, 100), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    n_params, n_active = M.active_params(mc, nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq_len
    batch = {"tokens": jnp.asarray(rng.integers(0, mc.vocab_size, (B, T)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, mc.vocab_size, (B, T)), jnp.int32),
             "loss_mask": jnp.ones((B, T), jnp.float32)}
    step = jax.jit(make_train_step(graphdef, 1), donate_argnums=0)
    flops = M.train_flops_per_step(model, n_active, batch=B, seq_len=T)

    def run(state):
        return step(state, batch)[0]

    # Warm-up (compile) then timed repeats, threading the donated state through.
    import time

    state = run(state)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state = run(state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    peak = M.matmul_rate()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"model: d_model={mc.d_model} n_layers={mc.n_layers} heads={mc.n_heads} "
          f"params={n_params / 1e6:.1f}M (non-embedding {(n_active) / 1e6:.1f}M), "
          f"attention impl={mc.attention.impl}")
    print(f"batch {B} x {T} tokens, step time {t:.3f} s (median of {args.repeats})")
    print(f"model FLOPs/step {flops / 1e12:.3f} TFLOP -> {flops / t / 1e9:.1f} GFLOP/s")
    print(f"measured float32 matmul rate {peak / 1e9:.1f} GFLOP/s -> "
          f"fraction {flops / t / peak:.1%}")


if __name__ == "__main__":
    main()
