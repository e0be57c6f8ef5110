"""RWKV-6 / RWKV-7 ops: chunk form vs recurrent form (forward), same run, same shapes.

Run: PYTHONPATH=$PWD python -m experiments.bench_rwkv --seq-len 8192
Prints the median time of each form and the ratio recurrent / chunk (issue 17 asks
>= 10x at 64K on an accelerator; on a CPU the ratio is smaller).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from longctx import ops


def _inputs(op, B, T, H, K):
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    n = lambda i: jax.random.normal(ks[i], (B, T, H, K))  # noqa: E731
    w = -0.6 * jax.nn.sigmoid(n(0))
    if op == "rwkv6":
        return dict(r=n(1), k=n(2), v=n(3), w=w, u=jnp.zeros((H, K)))
    kap = n(4) / jnp.linalg.norm(n(4), axis=-1, keepdims=True)
    return dict(r=n(1), w=w, k=n(2), v=n(3), a=-kap, b=kap * jax.nn.sigmoid(n(5)))


def _time(fn, x, reps):
    jax.block_until_ready(fn(x))  # compile
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    for op in ("rwkv6", "rwkv7"):
        x = _inputs(op, a.batch, a.seq_len, a.heads, a.head_dim)
        t = {}
        for form in ("recurrent", "chunk"):
            f = jax.jit(lambda x, form=form: getattr(ops, op)(
                **x, chunk_size=a.chunk_size, form=form)[0])
            t[form] = _time(f, x, a.reps)
        print(f"{op} T={a.seq_len} B={a.batch} H={a.heads} K=V={a.head_dim} "
              f"chunk={a.chunk_size}: recurrent {t['recurrent'] * 1e3:.1f} ms, chunk "
              f"{t['chunk'] * 1e3:.1f} ms, recurrent/chunk {t['recurrent'] / t['chunk']:.2f}x")


if __name__ == "__main__":
    main()
