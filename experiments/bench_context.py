"""Benchmark: per-device memory of context parallelism (ring, all-gather, sequence-parallel
linear attention) on 1, 2, 4, 8 simulated CPU devices.

    python -m experiments.bench_context                          # 32K and 128K, 1/2/4/8 devices
    python -m experiments.bench_context --lengths 8192 --devices 1 8 --no-frontier

For each method, total length ``T`` and number ``N`` of devices on the mesh axis
``sequence``, the fwd+bwd of a causal attention (``B=1``, ``Hq=4``, ``Hkv=1``,
``D=64``; linear: the gated delta rule, ``H=4``, ``K=V=64``, chunk 64) is compiled
(not run) with inputs sharded along time, and its per-device compiled scratch
(``memory_analysis().temp_size_in_bytes`` of the SPMD program, deterministic on
CPU) is printed with its ratio to one device at the same length, measured in the
same run. Goal: per-device memory ~ 1/N (8 devices <= 0.2x one device).

``--frontier``: the longest context (doubling from ``--budget-length``) whose
per-device scratch stays within the scratch of one device at ``--budget-length``
(``--slack``, default 0.1%, for allocator bookkeeping: more loops in the N-device
program mean a few more loop-tuple tables): the longest trainable context at a fixed per-device budget, which should grow
~N; ``N*L / L`` is the per-device scratch at ``N x --budget-length`` on ``N`` devices over
that budget (1.0: the ring holds N times the tokens in the same per-device memory).
Results: ``docs/results/context_parallel.md``.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from longctx.parallel import context, context_linear  # noqa: E402
from longctx.train.metrics import append_jsonl  # noqa: E402

METHODS = ("ring", "all_gather", "linear_sp")
# ring_permuted: the ring as the model calls it (tokens permuted to zigzag order once per
# forward, inputs_permuted=True): no per-call permutation copies, so the chunk in flight
# (K/V forward; K/V and dK/dV backward) is what an N-device program holds on top.
EXTRA = ("ring_permuted",)
HQ, HKV, D = 4, 1, 64


def _mesh(n):
    return jax.make_mesh((n,), ("sequence",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])


def _loss(method):
    if method == "linear_sp":
        def loss(q, k, v, beta, g):
            o, _ = context_linear.delta_rule(q, k, v, beta, g=g, chunk_size=64)
            return jnp.sum(o * o)
    else:
        strategy, permuted = method.removesuffix("_permuted"), method.endswith("_permuted")

        def loss(q, k, v, beta, g):
            del beta, g
            o = context.attention(q, k, v, strategy=strategy, inputs_permuted=permuted)
            return jnp.sum(o ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def scratch(method, T, n):
    """Per-device compiled scratch bytes of the fwd+bwd of ``method`` at length ``T``."""
    mesh = _mesh(n)
    seq = NamedSharding(mesh, P(None, "sequence"))
    heads_kv = HQ if method == "linear_sp" else HKV

    def arg(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=seq)

    args = (arg(1, T, HQ, D), arg(1, T, heads_kv, D), arg(1, T, heads_kv, D), arg(1, T, HQ),
            arg(1, T, HQ))
    with jax.set_mesh(mesh):
        ma = _loss(method).lower(*args).compile().memory_analysis()
    return ma.temp_size_in_bytes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA)
    p.add_argument("--frontier", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--budget-length", type=int, default=16384)
    p.add_argument("--slack", type=float, default=1e-3,
                   help="frontier: relative slack on the budget (allocator bookkeeping)")
    p.add_argument("--json", default=None, help="also write the rows to this JSONL file")
    args = p.parse_args(argv)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"attention: B=1 Hq={HQ} Hkv={HKV} D={D} causal (zigzag load balance); "
          f"linear_sp: gated delta rule H={HQ} K=V={D} chunk 64")
    rows = []
    print("\n| method | T | devices | per-device scratch MiB | vs 1 device |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        for T in args.lengths:
            base = None
            for n in args.devices:
                b = scratch(method, T, n)
                base = b if base is None else base
                rows.append(dict(bench="context", method=method, T=T, devices=n,
                                 scratch_mib=b / 2**20, ratio=b / base))
                print(f"| {method} | {T} | {n} | {b / 2**20:.1f} | {b / base:.3f} |", flush=True)
    if args.frontier:
        L = args.budget_length
        print(f"\nlongest context within the 1-device scratch at T={L} (doubling from {L}):")
        print("| method | budget MiB | " + " | ".join(f"{n} dev" for n in args.devices)
              + " | " + " | ".join(f"N*L / L, {n} dev" for n in args.devices if n > 1) + " |")
        print("|---|---|" + "---|" * (2 * len(args.devices) - (1 in args.devices)))
        for method in args.methods:
            budget = scratch(method, L, 1)
            best, at_nl = [], []
            for n in args.devices:
                T, seen = L, {}
                while 2 * T <= 4 * L * n:
                    seen[2 * T] = scratch(method, 2 * T, n)
                    if seen[2 * T] > budget * (1 + args.slack):
                        break
                    T *= 2
                best.append(T)
                if n > 1:
                    at_nl.append((seen.get(n * L) or scratch(method, n * L, n)) / budget)
                rows.append(dict(bench="context_frontier", method=method, devices=n,
                                 budget_mib=budget / 2**20, longest=T, slack=args.slack,
                                 at_n_times_budget_length=at_nl[-1] if n > 1 else 1.0))
            print(f"| {method} | {budget / 2**20:.1f} | "
                  + " | ".join(f"{T // 1024}K ({T // L}x)" for T in best) + " | "
                  + " | ".join(f"{r:.5f}" for r in at_nl) + " |", flush=True)
    append_jsonl(args.json, rows)


if __name__ == "__main__":
    main()
