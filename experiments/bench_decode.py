"""Benchmark: the decode frontier -- tokens/s and state memory per backend by context.

    python -m experiments.bench_decode                              # 1K 8K 32K 128K, every backend
    python -m experiments.bench_decode --lengths 1024 8192 --backends full linear
    python -m experiments.bench_decode --max-prefill-s 120          # skip lengths predicted slower

For each backend and context ``L``: a prompt of ``L`` random tokens is prefilled
(``longctx.generate.prefill``: one ``model.step`` call per piece, ``model.segment_len``
segments for the recurrent backend, ``--prefill-chunk`` tokens otherwise), then
``--new`` tokens (default 128) are decoded greedily in the jitted loop of
``longctx.generate.decode`` -- the same two functions ``longctx.generate`` runs. Printed
per point: prefill seconds, decode tokens/s (median of ``--repeats`` runs after a
compile run, batch 1; prefill: one run after compiling), the decode state's size (every layer's KV cache / matrix
state / XL ring and memories, summed over the pytree's leaves) and the compiled
scratch memory of the decode loop. Below the table: each backend's decode speed and
state at the longest length as ratios against its own 1K point.

Exact attention's decode cost and state grow with context (its KV cache holds every
key: ``model.max_seq_len`` is set to ``L + new``); linear attention's matrix state and
the recurrent backend's one-segment ring + compressive memory do not -- the
run-time efficiency that brings RNN-like memory back. The model is
``experiments/configs/sweep.yaml``'s (tiny: the frontier's shape, not absolute speed).
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
from longctx.generate import decode, prefill

CONFIG = "experiments/configs/sweep.yaml"
BACKENDS = {
    "full": ["model.attention.backend=full"],
    "linear": ["model.attention.backend=linear"],
    "recurrent": ["model.attention.backend=recurrent", "model.segment_len=256",
                  "model.attention.recurrent.cache_segments=1",
                  "model.attention.recurrent.compressive=delta"],
    # the sweep's hybrid row: 3 gated DeltaNet layers : 1 exact attention layer
    "hybrid": ["model.n_layers=4", "model.attention.pattern=[linear, linear, linear, full]",
               "model.attention.linear.variant=gated_deltanet"],
}


def state_bytes(state) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def measure(name: str, L: int, *, new: int, repeats: int, prefill_chunk: int, seed: int = 0):
    cfg = longctx.load_config(CONFIG, BACKENDS[name] + [f"model.max_seq_len={L + new}"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    piece = cfg.model.segment_len or min(prefill_chunk, L)
    prompt = jax.random.randint(jax.random.PRNGKey(seed), (1, L), 0, cfg.model.vocab_size,
                                jnp.int32)

    pre = jax.jit(lambda p, t: prefill(nnx.merge(graphdef, p), t, piece))
    pre = pre.lower(params, prompt).compile()
    t0 = time.perf_counter()
    logits, state = jax.block_until_ready(pre(params, prompt))  # one run, after compiling
    prefill_s = time.perf_counter() - t0

    dec = jax.jit(lambda p, lg, st: decode(nnx.merge(graphdef, p), lg, st, jnp.uint32(0),
                                           jnp.int32(-1), max_new_tokens=new, temperature=0.0,
                                           top_k=None, top_p=None))
    compiled = dec.lower(params, logits, state).compile()
    scratch = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params, logits, state))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, logits, state))
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    return {"backend": name, "length": L, "prefill_s": prefill_s, "decode_tok_s": new / dt,
            "state_mib": state_bytes(state) / 2**20, "scratch_mib": scratch / 2**20}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    p.add_argument("--new", type=int, default=128, help="decoded tokens after the prompt")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-chunk", type=int, default=1024,
                   help="prompt tokens per model.step call (models not run in segments)")
    p.add_argument("--max-prefill-s", type=float, default=300.0,
                   help="skip a length whose prefill is predicted (log-log) to take longer")
    args = p.parse_args(argv)

    rows = []
    print(f"decode of {args.new} tokens after an L-token prompt, batch 1 ({CONFIG}; "
          f"{jax.devices()[0].device_kind})\n")
    print("| backend | L | prefill s | decode tok/s | state MiB | decode scratch MiB |")
    print("|---|---|---|---|---|---|")
    for name in args.backends:
        done = []
        for L in sorted(args.lengths):
            if len(done) >= 2:  # predict this prefill from the last two (log-log)
                (l1, t1), (l2, t2) = done[-2], done[-1]
                slope = math.log(t2 / t1) / math.log(l2 / l1)
                pred = t2 * (L / l2) ** slope
                if pred > args.max_prefill_s:
                    print(f"| {name} | {L} | skipped: prefill predicted {pred:.0f} s | | | |",
                          flush=True)
                    continue
            r = measure(name, L, new=args.new, repeats=args.repeats,
                        prefill_chunk=args.prefill_chunk)
            rows.append(r)
            done.append((L, r["prefill_s"]))
            print(f"| {name} | {L} | {r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} | "
                  f"{r['state_mib']:.3f} | {r['scratch_mib']:.2f} |", flush=True)
    print()
    for name in args.backends:
        mine = [r for r in rows if r["backend"] == name]
        if len(mine) >= 2:
            a, b = mine[0], mine[-1]
            print(f"{name}: {b['length'] // 1024}K vs {a['length'] // 1024}K: decode speed x"
                  f"{b['decode_tok_s'] / a['decode_tok_s']:.2f}, state x"
                  f"{b['state_mib'] / a['state_mib']:.2f}")
    return rows


if __name__ == "__main__":
    main()
