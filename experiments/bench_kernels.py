"""Benchmark: the accelerator kernels against the pure-JAX forms they replace (fwd+bwd).

    python -m experiments.bench_kernels                 # CPU: small sizes, see below
    python -m experiments.bench_kernels --lengths 4096 16384 65536 --dtype bfloat16  # GPU/TPU

Rows, each a median fwd+bwd time and a ratio against its baseline measured in
the same run (these machines are noisy):

* ``attention``: ``impl="splash"`` (Pallas TPU) vs ``impl="flash"`` (pure JAX);
* ``linear``: GLA ``form="pallas"`` vs ``form="chunk"`` (scalar and per-key gates),
  and the delta rule likewise (gated DeltaNet, KDA);
* ``moe``: dropless MoE with ``jax.lax.ragged_dot`` vs the ``blocks`` grouped matmul.

Where the platform cannot compile a Pallas kernel (CPU) its rows run the same
kernel with ``interpret=True`` at the smallest length only, to show the path
runs end to end: **interpret-mode times are not a speed measurement** (the
Pallas interpreter executes the kernel body op by op), and they are labelled so.
The MoE rows are real measurements on every platform.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from longctx.backends.full import ops as full
from longctx.backends.linear import ops as linear
from longctx.kernels import delta_rule as pallas_delta
from longctx.kernels import linear_attention as pallas_linear
from longctx.kernels import splash_attention as splash
from longctx.moe import ops as moe
from longctx.train.metrics import median_time


def fwd_bwd(f, n_args):
    def loss(*a):
        out = f(*a)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))


def _row(name, T, t_new, t_base, note=""):
    print(f"| {name} | {T} | {t_new * 1e3:.1f} | {t_base * 1e3:.1f} | "
          f"{t_base / t_new:.2f}x | {note} |")


def bench_attention(args, dtype, key):
    interp = not splash.available()
    for T in args.lengths[:1] if interp else args.lengths:
        q, k, v = (jax.random.normal(kk, (1, T, args.heads, 64), dtype)
                   for kk in jax.random.split(key, 3))
        new = fwd_bwd(lambda q, k, v: splash.splash_attention(q, k, v, interpret=interp), 3)
        base = fwd_bwd(lambda q, k, v: full.attention(q, k, v, impl="flash"), 3)
        t_new = median_time(new, q, k, v, repeats=args.repeats)
        t_base = median_time(base, q, k, v, repeats=args.repeats)
        _row("attention splash vs flash", T, t_new, t_base,
             "INTERPRET MODE: not a speed measurement" if interp else "")


def bench_linear(args, dtype, key):
    interp = not pallas_linear.available()
    H, K = args.heads, 64
    for gate in ("scalar", "per_key"):
        C = 64 if gate == "scalar" else 16
        for T in args.lengths[:1] if interp else args.lengths:
            ks = jax.random.split(key, 4)
            q, k, v = (jax.random.normal(kk, (1, T, H, K), dtype) for kk in ks[:3])
            shape = (1, T, H) if gate == "scalar" else (1, T, H, K)
            g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape) + 3.0)
            new = fwd_bwd(lambda q, k, v, g: pallas_linear.linear_attention(
                q, k, v, g=g, chunk_size=C, interpret=interp), 4)
            base = fwd_bwd(lambda q, k, v, g: linear.linear_attention(
                q, k, v, g=g, chunk_size=C, form="chunk"), 4)
            t_new = median_time(new, q, k, v, g, repeats=args.repeats)
            t_base = median_time(base, q, k, v, g, repeats=args.repeats)
            _row(f"GLA {gate} gate pallas vs chunk (C={C})", T, t_new, t_base,
                 "INTERPRET MODE: not a speed measurement" if interp else "")
    for gate in ("scalar", "per_key"):  # gated DeltaNet, KDA
        C = 64 if gate == "scalar" else 16
        for T in args.lengths[:1] if interp else args.lengths:
            ks = jax.random.split(key, 5)
            q, k, v = (jax.random.normal(kk, (1, T, H, K), dtype) for kk in ks[:3])
            k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
            shape = (1, T, H) if gate == "scalar" else (1, T, H, K)
            g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape) + 3.0)
            beta = jax.nn.sigmoid(jax.random.normal(ks[4], (1, T, H)))
            new = fwd_bwd(lambda q, k, v, g, beta: pallas_delta.delta_rule(
                q, k, v, beta, g=g, chunk_size=C, interpret=interp), 5)
            base = fwd_bwd(lambda q, k, v, g, beta: linear.delta_rule(
                q, k, v, beta, g=g, chunk_size=C), 5)
            t_new = median_time(new, q, k, v, g, beta, repeats=args.repeats)
            t_base = median_time(base, q, k, v, g, beta, repeats=args.repeats)
            _row(f"delta rule {gate} gate pallas vs chunk (C={C})", T, t_new, t_base,
                 "INTERPRET MODE: not a speed measurement" if interp else "")


def bench_moe(args, dtype, key):
    E, k, D, F = 8, 2, 128, 256
    for N in args.moe_tokens:
        ks = jax.random.split(key, 5)
        x = jax.random.normal(ks[0], (N, D), dtype)
        experts = jax.lax.top_k(jax.random.normal(ks[1], (N, E)), k)[1].astype(jnp.int32)
        weights = jnp.full((N, k), 0.5, jnp.float32)
        w = [0.1 * jax.random.normal(kk, s, dtype)
             for kk, s in zip(ks[2:], [(E, D, F), (E, D, F), (E, F, D)])]

        def run(impl):
            # routing passed as arguments (not closed over: XLA would constant-fold the sort)
            return fwd_bwd(lambda x, wg, wu, wd, e, wt: moe.dropless_moe(
                x, e, wt, wg, wu, wd, impl=impl), 4)

        t_new = median_time(run("ragged_dot"), x, *w, experts, weights, repeats=args.repeats)
        t_base = median_time(run("blocks"), x, *w, experts, weights, repeats=args.repeats)
        _row(f"MoE ragged_dot vs blocks (E={E} k={k} d={D} f={F})", N, t_new, t_base,
             f"tokens; {jax.default_backend()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256])
    p.add_argument("--moe-tokens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", default=["attention", "linear", "moe"])
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    key = jax.random.PRNGKey(0)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    print("| row | T / tokens | new ms | baseline ms | speed-up (baseline / new) | note |")
    print("|---|---|---|---|---|---|")
    for name, fn in (("attention", bench_attention), ("linear", bench_linear),
                     ("moe", bench_moe)):
        if name in args.only:
            fn(args, dtype, key)


if __name__ == "__main__":
    main()
