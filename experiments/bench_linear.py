"""Benchmark: linear attention forms (chunk, recurrent, parallel) vs flash attention, fwd+bwd.

    python -m experiments.bench_linear                        # 4K..1M tokens, B=1 H=4 K=V=64
    python -m experiments.bench_linear --lengths 4096 16384 --repeats 2
    python -m experiments.bench_linear --op gated_deltanet --max-flash 0
    python -m experiments.bench_linear --forward-only --lengths 65536 1048576 --max-flash 0

``chunk`` is the parallel chunk form (all chunks as batched matmuls, only the
state recurrence over chunks sequential); ``chunk_scan`` the previous sequential
chunk form (one ``lax.scan`` step per chunk), measured in the same run: the
``scan/chunk`` column is the speed-up of the parallel form.

For each length and form it prints the median fwd+bwd time (after one warm-up
run; expensive runs are repeated fewer times, see ``--time-budget``) and the
compiled scratch memory (``jit(f).lower(...).compile().memory_analysis()
.temp_size_in_bytes``, deterministic on CPU). Forms are skipped above their
length limits (the quadratic parallel form and the per-token recurrent scan get
slow, flash is quadratic in time) or when their scratch memory exceeds
``--mem-budget-gib``. Below the table: the log-log slope of chunk time from 16K
to the longest length (1.0 = linear), the chunk/recurrent speed ratio at 64K and
the crossover length from which chunked linear attention beats flash.

Below that: each chunk form's achieved rate (``3 x linear.chunk_flops``, the
forward's matmul FLOPs times 3 for fwd+bwd) as a fraction of the measured
``2048^2`` float32 matmul rate, by wall time and by process CPU time (on a
shared machine the wall time includes waiting for the cores).

``--op`` picks the kernel: ``linear`` (no gate), ``retnet`` (one log-decay per
head and step, ``g [B, T, H]``: RetNet / simple GLA), ``gla`` (per-key gate
``g [B, T, H, K]``), ``deltanet`` and ``gated_deltanet`` (the delta rule).
Gradients are taken with respect to q, k, v and the gate / beta.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from longctx.backends.full import ops as full
from longctx.backends.linear import ops as linear
from longctx.train.metrics import append_jsonl, loglog_slope as slope, scratch_bytes

OPS = ("linear", "retnet", "gla", "deltanet", "gated_deltanet", "kda")


CPU_TIMES: dict = {}  # id(fn) -> the last timed() call's median process CPU seconds


def timed(fn, *args, repeats=3, budget_s=60.0):
    """Median seconds of ``fn(*args)`` after one warm-up; fewer repeats for slow runs.

    Also records the median process CPU time (all threads) in ``CPU_TIMES[id(fn)]``:
    on a shared machine wall time includes waiting for the cores, CPU time does not."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))  # warm-up (compiled already by scratch_bytes)
    first = time.perf_counter() - t0
    n = max(1, min(repeats, int(budget_s // max(first, 1e-9))))
    times, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU_TIMES[id(fn)] = statistics.median(cpu)
    return statistics.median(times)


def matmul_rate(n=2048, repeats=5):
    """Measured float32 matmul rate ``[n, n] x [n, n]``: (GFLOP/s wall, per CPU-second)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    wall = timed(f, a, a, repeats=repeats)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / CPU_TIMES[id(f)] / 1e9


def inputs(op, B, T, H, D, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.float32)
    if op in ("deltanet", "gated_deltanet", "kda"):
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    extra = {}
    if op in ("retnet", "gated_deltanet"):
        extra["g"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 4.0)
    if op in ("gla", "kda"):
        extra["g"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, D)) + 4.0) / 16
    if op in ("deltanet", "gated_deltanet", "kda"):
        extra["beta"] = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    return (q, k, v), extra


def fwd_bwd_linear(op, form, chunk_size, forward_only=False):
    def loss(qkv, extra):
        q, k, v = qkv
        if op in ("deltanet", "gated_deltanet", "kda"):
            o, _ = linear.delta_rule(q, k, v, extra["beta"], g=extra.get("g"),
                                     chunk_size=chunk_size, form=form)
        else:
            o, _ = linear.linear_attention(q, k, v, g=extra.get("g"), chunk_size=chunk_size,
                                           form=form)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    return jax.jit(loss if forward_only else jax.grad(loss, argnums=(0, 1)))


def op_flops(op, tokens, head_dim, chunk_size, forward_only=False):
    """fwd+bwd matmul FLOPs of the chunk form: 3x the forward (``linear.chunk_flops``)."""
    return (1 if forward_only else 3) * linear.chunk_flops(tokens, key_dim=head_dim, value_dim=head_dim,
                                  chunk_size=chunk_size,
                                  delta=op in ("deltanet", "gated_deltanet", "kda"))


def fwd_bwd_flash(block):
    def loss(qkv, extra):
        o = full.attention(*qkv, causal=True, impl="flash", block_q=block, block_k=block)
        return jnp.sum(o.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=0))




def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[4096, 8192, 16384, 32768, 65536, 262144, 1048576])
    p.add_argument("--op", choices=OPS, default="retnet")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64, help="K = V")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--flash-block", type=int, default=full.DEFAULT_BLOCK_Q)
    p.add_argument("--max-parallel", type=int, default=16384, help="longest parallel run")
    p.add_argument("--max-recurrent", type=int, default=65536, help="longest recurrent run")
    p.add_argument("--max-chunk-scan", type=int, default=1048576,
                   help="longest sequential-chunk (baseline) run")
    p.add_argument("--max-flash", type=int, default=32768, help="longest flash run")
    p.add_argument("--mem-budget-gib", type=float, default=12.0,
                   help="skip a run whose compiled scratch memory is larger")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=60.0,
                   help="seconds of timed repeats per run (at least one repeat)")
    p.add_argument("--forward-only", action="store_true",
                   help="time the forward pass only (linear forms; flash stays fwd+bwd)")
    p.add_argument("--json", default=None, help="also write the rows to this JSONL file")
    args = p.parse_args(argv)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}; op={args.op} B={args.batch} H={args.heads} "
          f"K=V={args.head_dim} chunk={args.chunk_size} flash block={args.flash_block}; "
          f"{'forward only' if args.forward_only else 'fwd+bwd'}")
    mm_wall, mm_cpu = matmul_rate()
    print(f"measured matmul rate (2048^2 float32): {mm_wall:.1f} GFLOP/s wall, "
          f"{mm_cpu:.1f} GFLOP per CPU-second")
    fns = {form: fwd_bwd_linear(args.op, form, args.chunk_size, args.forward_only)
           for form in linear.FORMS + linear.BASELINE_FORMS}
    fns["flash"] = fwd_bwd_flash(args.flash_block)
    limits = {"chunk": 1 << 62, "chunk_scan": args.max_chunk_scan,
              "recurrent": args.max_recurrent,
              "parallel": args.max_parallel, "flash": args.max_flash}
    forms = ("chunk", "chunk_scan", "recurrent", "parallel", "flash")

    header = ("| T | " + " | ".join(f"{f} s" for f in forms) + " | chunk us/token "
              "| scan/chunk | recurrent/chunk | flash/chunk | " + " | ".join(f"{f} MiB" for f in forms) + " |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1), flush=True)
    rows = []
    for T in args.lengths:
        qkv, extra = inputs(args.op, args.batch, T, args.heads, args.head_dim)
        row = {"T": T, "op": args.op, "pass": "fwd" if args.forward_only else "fwd+bwd"}
        for form in forms:
            if T > limits[form]:
                continue
            mem = scratch_bytes(fns[form], qkv, extra)
            row[f"{form}_scratch"] = mem
            if mem > args.mem_budget_gib * 2**30:
                row[f"{form}_skipped"] = f"scratch {mem / 2**30:.1f} GiB > budget"
                continue
            row[f"{form}_s"] = timed(fns[form], qkv, extra, repeats=args.repeats,
                                     budget_s=args.time_budget)
            row[f"{form}_cpu_s"] = CPU_TIMES[id(fns[form])]
        rows.append(row)
        del qkv, extra

        def s(f):
            return f"{row[f + '_s']:.3f}" if f + "_s" in row else "-"

        def mib(f):
            return f"{row[f + '_scratch'] / 2**20:.1f}" if f + "_scratch" in row else "-"

        def ratio(f):
            return f"{row[f + '_s'] / row['chunk_s']:.1f}x" if f + "_s" in row else "-"

        per_tok = row["chunk_s"] / (args.batch * T) * 1e6
        print(f"| {T} | " + " | ".join(s(f) for f in forms) + f" | {per_tok:.2f} | "
              f"{ratio('chunk_scan')} | {ratio('recurrent')} | {ratio('flash')} | "
              + " | ".join(mib(f) for f in forms) + " |", flush=True)

    long = [(r["T"], r["chunk_s"]) for r in rows if r["T"] >= 16384 and "chunk_s" in r]
    if len(long) >= 2:
        print(f"\nchunk time log-log slope {long[0][0]}..{long[-1][0]}: {slope(long):.3f} "
              "(1.0 = linear; target <= 1.1)")
    at64 = [r for r in rows if r["T"] == 65536 and "recurrent_s" in r]
    if at64:
        print(f"chunk vs recurrent at 64K: {at64[0]['recurrent_s'] / at64[0]['chunk_s']:.1f}x "
              "faster (target >= 10x)")
    print("\n| T | form | wall s | CPU s | GFLOP/s wall | % of matmul (wall) "
          "| GFLOP per CPU-s | % of matmul (CPU) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        fl = op_flops(args.op, args.batch * args.heads * r["T"], args.head_dim, args.chunk_size,
                      args.forward_only)
        for f in ("chunk", "chunk_scan"):
            if f + "_s" in r:
                w, c = r[f + "_s"], r[f + "_cpu_s"]
                r[f + "_gflops"] = fl / w / 1e9
                print(f"| {r['T']} | {f} | {w:.3f} | {c:.3f} | {fl / w / 1e9:.1f} | "
                      f"{100 * fl / w / 1e9 / mm_wall:.0f}% | {fl / c / 1e9:.1f} | "
                      f"{100 * fl / c / 1e9 / mm_cpu:.0f}% |")
    for r in rows:
        if "chunk_scan_s" in r:
            print(f"parallel chunk vs sequential chunk form at {r['T']}: "
                  f"{r['chunk_scan_s'] / r['chunk_s']:.2f}x faster (wall), "
                  f"{r['chunk_scan_cpu_s'] / r['chunk_cpu_s']:.2f}x (CPU time)")
    both = [r for r in rows if "flash_s" in r]
    wins = [r["T"] for r in both if r["chunk_s"] < r["flash_s"]]
    if both:
        if wins and all(r["chunk_s"] < r["flash_s"] for r in both if r["T"] >= wins[0]):
            where = (f"<= {wins[0]}" if wins[0] == both[0]["T"] else
                     f"between {max(r['T'] for r in both if r['T'] < wins[0])} and {wins[0]}")
            print(f"crossover: chunked linear attention beats flash from T {where}")
        else:
            print(f"crossover: flash is faster at every measured length up to {both[-1]['T']}")
    mem = [(r["T"], r["chunk_scratch"]) for r in rows if "chunk_scratch" in r]
    if len(mem) >= 2:
        print(f"chunk scratch per token: {mem[0][1] / mem[0][0]:.0f} B at {mem[0][0]}, "
              f"{mem[-1][1] / mem[-1][0]:.0f} B at {mem[-1][0]}")
    append_jsonl(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
