"""Benchmark: chunked vs plain cross entropy in a training step (``train.loss_chunk_size``).

    python -m experiments.bench_loss                                  # V=128K, T=16K memory; timing at V=32K, T=2K
    python -m experiments.bench_loss --vocab 131072 --seq-len 16384 --time-vocab 32768 --time-seq-len 2048

The step is the trainer's (``longctx.train.step.make_train_step``: loss, gradients,
AdamW) for a tiny-width model (``--d-model``, one layer, flash attention). Memory:
the compiled scratch (``memory_analysis().temp_size_in_bytes``, compile only, nothing
runs) of the plain loss, which holds ``[B, T, V]`` float32 logits and their gradient,
against the chunked loss at ``--chunk`` tokens; target ratio <= 1/8. Time: the median
step at a size this machine can run both forms at (``--time-vocab``, ``--time-seq-len``);
target chunked / plain <= 1.2 (the chunked backward recomputes each chunk's logits).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import longctx
from longctx.train import make_optimizer, make_train_step

CONFIG = "experiments/configs/tiny.yaml"


def _step(V, T, d_model, chunk):
    cfg = longctx.load_config(CONFIG, [
        f"model.vocab_size={V}", f"model.d_model={d_model}", "model.n_layers=1", "model.n_heads=2",
        "model.n_kv_heads=1", f"model.mlp_dim={2 * d_model}", "model.attention.impl=flash",
        "model.attention.block_q=512", "model.attention.block_k=512", f"model.max_seq_len={T}"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(cfg.optim, 100), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    batch = {"tokens": jnp.zeros((1, T), jnp.int32), "targets": jnp.ones((1, T), jnp.int32),
             "loss_mask": jnp.ones((1, T), jnp.float32)}
    step = jax.jit(make_train_step(graphdef, 1, loss_chunk_size=chunk))
    return step.lower(state, batch).compile(), state, batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--time-vocab", type=int, default=32768)
    p.add_argument("--time-seq-len", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    mib = {}
    for chunk in (0, args.chunk):
        c, _, _ = _step(args.vocab, args.seq_len, args.d_model, chunk)
        mib[chunk] = c.memory_analysis().temp_size_in_bytes / 2**20
    print(f"train step scratch, V={args.vocab}, T={args.seq_len}, d_model={args.d_model}, "
          f"batch 1 (compile only):")
    print(f"  plain   {mib[0]:10.1f} MiB   (the logits alone: "
          f"{args.vocab * args.seq_len * 4 / 2**20:.0f} MiB)")
    print(f"  chunked {mib[args.chunk]:10.1f} MiB   (chunk {args.chunk})   ratio "
          f"{mib[args.chunk] / mib[0]:.4f}  (target <= 0.125)")

    secs = {}
    for chunk in (0, args.chunk):
        c, state, batch = _step(args.time_vocab, args.time_seq_len, args.d_model, chunk)
        jax.block_until_ready(c(state, batch))
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(c(state, batch))
            ts.append(time.perf_counter() - t0)
        secs[chunk] = statistics.median(ts)
    print(f"train step time, V={args.time_vocab}, T={args.time_seq_len}: plain "
          f"{secs[0]:.3f} s, chunked {secs[args.chunk]:.3f} s, ratio "
          f"{secs[args.chunk] / secs[0]:.2f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
