"""Compile time, compiled program size and step time of a train step: scanned vs unrolled layers.

    python -m experiments.bench_scan                      # 4, 16, 32, 64 layers, tiny model
    python -m experiments.bench_scan --layers 4 16 --repeats 3
    python -m experiments.bench_scan --layers 4 64 --layouts scanned   # the compile-time goal only

Goal (issue 20): scanned compile time at 64 layers <= 1.5x that at 4 layers; scanned step
time within 1.1x of unrolled. Prints one row per (depth, layout) and the ratios, all measured
in this run (CPU timings are noisy: compare ratios, not seconds; on a shared machine the
compile's process CPU time, column `cpu s`, is less disturbed by other load than wall time).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import load_config
from longctx.model import build_model
from longctx.train import make_optimizer, make_train_step
from longctx.train.metrics import median_time


def measure(n_layers: int, scan: bool, args) -> dict:
    cfg = load_config("experiments/configs/tiny.yaml", [
        f"model.n_layers={n_layers}", f"model.scan_layers={str(scan).lower()}",
        f"model.d_model={args.d_model}", f"model.mlp_dim={2 * args.d_model}",
        f"model.remat={args.remat}", *args.override])
    model = build_model(cfg.model, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(cfg.optim, 10), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (args.batch, args.seq_len + 1), 0,
                                cfg.model.vocab_size)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": jnp.ones((args.batch, args.seq_len), jnp.int32)}
    step = jax.jit(make_train_step(graphdef, 1))
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = step.lower(state, batch).compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    mem = compiled.memory_analysis()
    step_s = median_time(lambda: compiled(state, batch), repeats=args.repeats)
    return {"layers": n_layers, "scan": scan, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
            "hlo_chars": len(compiled.as_text()),
            "code_bytes": getattr(mem, "generated_code_size_in_bytes", 0), "step_s": step_s}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32, 64])
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--remat", default="none")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", nargs="+", choices=["scanned", "unrolled"],
                   default=["scanned", "unrolled"])
    p.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides")
    args = p.parse_args()
    rows = {}
    print(f"{'layers':>6} {'layout':>8} {'compile s':>10} {'cpu s':>7} {'HLO chars':>10} "
          f"{'code B':>9} {'step ms':>8}", flush=True)
    scans = [layout == "scanned" for layout in args.layouts]
    for n in args.layers:
        for scan in scans:
            r = rows[n, scan] = measure(n, scan, args)
            print(f"{n:>6} {'scanned' if scan else 'unrolled':>8} {r['compile_s']:>10.2f} "
                  f"{r['compile_cpu_s']:>7.2f} {r['hlo_chars']:>10} {r['code_bytes']:>9} "
                  f"{1e3 * r['step_s']:>8.2f}",
                  flush=True)
    lo, hi = min(args.layers), max(args.layers)
    for scan in scans:
        print(f"{'scanned' if scan else 'unrolled'} compile {hi} vs {lo} layers: "
              f"{rows[hi, scan]['compile_s'] / rows[lo, scan]['compile_s']:.2f}x wall, "
              f"{rows[hi, scan]['compile_cpu_s'] / rows[lo, scan]['compile_cpu_s']:.2f}x CPU"
              + (" (goal <= 1.5x)" if scan else ""))
    if len(scans) < 2:
        return
    for n in args.layers:
        print(f"{n} layers: step time scanned / unrolled "
              f"{rows[n, True]['step_s'] / rows[n, False]['step_s']:.2f}x (goal <= 1.1x), "
              f"compile unrolled / scanned "
              f"{rows[n, False]['compile_s'] / rows[n, True]['compile_s']:.2f}x")

if __name__ == "__main__":
    main()
