"""Benchmark: flash attention vs ``jax.nn.dot_product_attention`` (fwd+bwd).

    python -m experiments.bench_attention                       # 2K..16K, B=1 H=4 D=64
    python -m experiments.bench_attention --lengths 1024 2048 --repeats 2

For each length it prints the median fwd+bwd time of both, their ratio (measured
in the same run: these machines are noisy), the compiled scratch memory of both
(``jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``, which is
deterministic on CPU), and flash's achieved FLOP rate as a fraction of a float32
matmul rate measured at the start of the run.

FLOPs counted (DESIGN.md "Measuring"): causal attention forward is
``4·B·T²·H·D / 2``; forward + backward is 3× that. Recomputation inside the
flash backward is not counted (it is overhead, not useful work).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from longctx.backends.full import ops as full
from longctx.train.metrics import append_jsonl, matmul_rate, median_time, scratch_bytes


def fwd_bwd(attn):
    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-q", type=int, default=full.DEFAULT_BLOCK_Q)
    p.add_argument("--block-k", type=int, default=full.DEFAULT_BLOCK_K)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-reference-above", type=int, default=1 << 30,
                   help="do not run jax.nn.dot_product_attention above this length")
    p.add_argument("--ref-budget-gb", type=float, default=12.0,
                   help="compile the reference but do not run it when its scratch memory "
                        "exceeds this (a run would be killed by the OS, not raise)")
    p.add_argument("--json", default=None, help="also write the rows to this JSONL file")
    args = p.parse_args(argv)

    peak = matmul_rate()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"measured float32 matmul rate: {peak / 1e9:.1f} GFLOP/s (1024^3 matmul)")
    flash = fwd_bwd(lambda q, k, v: full.attention(
        q, k, v, causal=True, impl="flash", block_q=args.block_q, block_k=args.block_k))
    ref = fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))

    header = ("| T | flash s | reference s | speed-up | flash scratch MiB | reference scratch MiB "
              "| memory ratio | flash GFLOP/s | of matmul rate |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for T in args.lengths:
        shape = (args.batch, T, args.heads, args.head_dim)
        q, k, v = (jax.random.normal(jax.random.PRNGKey(i), shape, jnp.float32) for i in range(3))
        flops = 3 * 4 * args.batch * T * T * args.heads * args.head_dim / 2
        t_f = median_time(flash, q, k, v, repeats=args.repeats)
        m_f = scratch_bytes(flash, q, k, v)
        row = dict(T=T, flash_s=t_f, flash_scratch=m_f, flash_flops=flops / t_f,
                   frac_of_matmul=flops / t_f / peak, matmul_rate=peak)
        if T <= args.skip_reference_above:
            row["ref_scratch"] = scratch_bytes(ref, q, k, v)
            if row["ref_scratch"] <= args.ref_budget_gb * 2**30:
                row["ref_s"] = median_time(ref, q, k, v, repeats=args.repeats)
            else:
                print(f"  T={T}: reference not run: compiled scratch "
                      f"{row['ref_scratch'] / 2**30:.1f} GiB > --ref-budget-gb {args.ref_budget_gb}",
                      flush=True)
        rows.append(row)
        r_s = row.get("ref_s", float("nan"))
        r_m = row.get("ref_scratch", float("nan"))
        print(f"| {T} | {t_f:.3f} | {r_s:.3f} | {r_s / t_f:.1f}x | {m_f / 2**20:.1f} | "
              f"{r_m / 2**20:.1f} | 1/{r_m / m_f:.0f} | {flops / t_f / 1e9:.1f} | "
              f"{flops / t_f / peak:.0%} |", flush=True)
    append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
