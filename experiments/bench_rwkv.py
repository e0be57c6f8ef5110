"""RWKV-6 / RWKV-7 / KDA ops: chunk vs recurrent at one length, chunk per-token time over
lengths, compiled scratch of chunk fwd+bwd over lengths.

Run: PYTHONPATH=$PWD python -m experiments.bench_rwkv
     PYTHONPATH=$PWD python -m experiments.bench_rwkv --ratio-len 65536 \
         --lengths 16384 65536 262144 1048576 --scratch-lengths 16384 65536 262144

Three parts, each op (``--ops``), B / H / K = V from the flags, log decays
``w = -0.6 sigmoid(x)`` (RWKV-7's range; KDA: ``g`` the same), so the chunk forms take
the factored per-key scores (``blocks.FACTORED``):

1. ``--ratio-len``: median forward time of ``recurrent``, ``chunk`` and
   ``chunk_scan``, and recurrent / chunk (issue 17 asks >= 10x at 64K), with the
   ceiling this device puts on that ratio: the least work of any chunk form
   (``CHUNK_MIN_FLOPS``) at the measured float32 matmul rate, against the measured
   recurrent time. Where the ceiling is under 10x, no chunk form can reach 10x here.
2. ``--lengths``: chunk forward time per token at each length and the least-squares
   log-log slope of time against length (issue 17: <= 1.1 from 16K to 1M). Forward only
   (the backward pass doubles the work at every length alike).
3. ``--scratch-lengths``: compiled scratch (``memory_analysis().temp_size_in_bytes``,
   deterministic, nothing runs) of chunk fwd+bwd, in bytes per token.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from longctx import ops
from longctx.train.metrics import loglog_slope as slope, matmul_rate

OPS = ("rwkv6", "rwkv7", "kda")
# FLOPs per token and head, in units of K*V, that every chunk form does at least: each
# chunk's K^T V state contribution (2) and the inter-chunk read q_eff S_0 (2); the
# intra-chunk scores and outputs (2 C (K + V)) and the delta rules' WY factors come on top.
# The recurrent step does 5 (rwkv6: decay 1, rank-1 update 2, read 2), 7 (kda) or 9 (rwkv7)
# of the same units as matrix-vector work, so the chunk form's only edge is the matmul rate.
CHUNK_MIN_FLOPS = 4


def _inputs(op, B, T, H, K):
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    n = lambda i: jax.random.normal(ks[i], (B, T, H, K))  # noqa: E731
    w = -0.6 * jax.nn.sigmoid(n(0))
    if op == "rwkv6":
        return dict(r=n(1), k=n(2), v=n(3), w=w, u=jnp.zeros((H, K)))
    kap = n(4) / jnp.linalg.norm(n(4), axis=-1, keepdims=True)
    if op == "kda":
        return dict(q=n(1), k=kap, v=n(3), beta=jax.nn.sigmoid(n(5)[..., 0]), g=w)
    return dict(r=n(1), w=w, k=n(2), v=n(3), a=-kap, b=kap * jax.nn.sigmoid(n(5)))


def _op(op):
    return ops.delta_rule if op == "kda" else getattr(ops, op)


def _fwd(op, form, chunk_size):
    return jax.jit(lambda x: _op(op)(**x, chunk_size=chunk_size, form=form)[0])


def _fwd_bwd(op, chunk_size):
    return jax.jit(jax.grad(lambda x: jnp.sum(_op(op)(**x, chunk_size=chunk_size,
                                                      form="chunk")[0] ** 2)))


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
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--ratio-len", type=int, default=65536, help="0: skip part 1")
    p.add_argument("--lengths", type=int, nargs="*", default=[16384, 65536, 262144, 1048576])
    p.add_argument("--scratch-lengths", type=int, nargs="*", default=[16384, 65536, 262144])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    shape = f"B={a.batch} H={a.heads} K=V={a.head_dim} chunk={a.chunk_size}"
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {shape}")
    for op in a.ops:
        if a.ratio_len:
            x = _inputs(op, a.batch, a.ratio_len, a.heads, a.head_dim)
            t = {f: _time(_fwd(op, f, a.chunk_size), x, a.reps)
                 for f in ("recurrent", "chunk", "chunk_scan")}
            print(f"{op} T={a.ratio_len} fwd: recurrent {t['recurrent'] * 1e3:.1f} ms, chunk "
                  f"{t['chunk'] * 1e3:.1f} ms, chunk_scan {t['chunk_scan'] * 1e3:.1f} ms; "
                  f"recurrent/chunk {t['recurrent'] / t['chunk']:.2f}x, recurrent/chunk_scan "
                  f"{t['recurrent'] / t['chunk_scan']:.2f}x", flush=True)
            mm = matmul_rate()  # measured once per process (cached)
            least = CHUNK_MIN_FLOPS * a.batch * a.ratio_len * a.heads * a.head_dim ** 2
            print(f"{op} ceiling of recurrent/chunk here: {t['recurrent'] * mm / least:.1f}x "
                  f"(a chunk form's least {least / 1e9:.2f} GFLOP at the measured matmul rate "
                  f"{mm / 1e9:.1f} GFLOP/s in {least / mm * 1e3:.1f} ms)", flush=True)
        pts = []
        for T in a.lengths:
            x = _inputs(op, a.batch, T, a.heads, a.head_dim)
            s = _time(_fwd(op, "chunk", a.chunk_size), x, a.reps)
            pts.append((T, s))
            print(f"{op} T={T} chunk fwd {s:.3f} s = {s / T * 1e6:.2f} us/token", flush=True)
        if len(pts) > 1:
            print(f"{op} chunk fwd time log-log slope {pts[0][0]}..{pts[-1][0]}: "
                  f"{slope(pts):.3f}", flush=True)
        mem = []
        for T in a.scratch_lengths:
            x = jax.eval_shape(lambda T=T: _inputs(op, a.batch, T, a.heads, a.head_dim))
            b = _fwd_bwd(op, a.chunk_size).lower(x).compile().memory_analysis().temp_size_in_bytes
            mem.append((T, b))
            print(f"{op} T={T} chunk fwd+bwd scratch {b / 2**20:.1f} MiB = {b / T:.0f} B/token",
                  flush=True)
        if len(mem) > 1:
            print(f"{op} scratch log-log slope: {slope(mem):.3f}", flush=True)


if __name__ == "__main__":
    main()
