"""Benchmark: an MoE training step against a dense model of equal active FLOPs.

    python -m experiments.bench_moe                          # tiny.yaml sizes, E=8, k=2, 8 x 256
    python -m experiments.bench_moe --experts 8 --k 2 --batch 8 --seq-len 256 --repeats 7
    python -m experiments.bench_moe model.n_layers=4          # any config override at the end

Rows: the dense model with ``mlp_dim = k * expert_dim`` (the same matmul FLOPs
per token as k experts of width ``expert_dim``), then the MoE model (E experts,
top-k) with dropless dispatch (``blocks`` grouped matmul, ``ragged_dot``) and
capacity dispatch (GShard one-hot, ``--capacity-factor``). Table 1: the
trainer's own update step (``longctx.train.step.make_train_step``: forward,
backward, AdamW) jitted on one device, state donated. Table 2: the feed-forward
layer alone (forward + backward wrt its input and weights on the same tokens),
where attention does not dilute the ratio. Rows are timed in interleaved rounds
(one call of each per round, after a warm-up) so that load from other processes
hits all of them alike; the tables give the median and the ratio to the dense
row of the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.config import load_config
from longctx.model import build_model
from longctx.layers import SwiGLU
from longctx.moe.layer import MoE
from longctx.moe.ops import default_block_size
from longctx.train import make_optimizer, make_train_step


def _step(cfg, batch):
    model = build_model(cfg.model, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(cfg.optim, 100), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    step = jax.jit(make_train_step(graphdef, 1), donate_argnums=0)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)  # compile + first step
    jax.block_until_ready(state)
    return {"step": step, "state": state, "metrics": metrics, "params": n_params,
            "compile_s": time.perf_counter() - t0, "times": []}


def _layer_step(cfg, x):
    """The feed-forward layer alone: jitted value and gradients wrt the input and weights."""
    m = cfg.model
    layer = (MoE(m.d_model, m.moe, mlp_dim=m.mlp_dim, rngs=nnx.Rngs(0)) if m.moe.num_experts
             else SwiGLU(m.d_model, m.mlp_dim, rngs=nnx.Rngs(0)))

    def loss(layer, x):
        y = layer(x)
        y, aux = y if isinstance(y, tuple) else (y, {})
        return jnp.sum(y * y), aux

    f = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    t0 = time.perf_counter()
    (_, metrics), _ = out = f(layer, x)
    jax.block_until_ready(out)
    step = lambda _state, _batch: (None, f(layer, x))  # noqa: E731
    return {"step": step, "state": None, "metrics": metrics, "params": 0,
            "compile_s": time.perf_counter() - t0, "times": []}


def _time(runs, batch, repeats):
    for _ in range(repeats):  # interleaved rounds: one call of each row per round
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], out = r["step"](r["state"], batch)
            jax.block_until_ready((r["state"], out))
            r["times"].append(time.perf_counter() - t0)


def _table(runs, rows, params=True):
    ref = np.median(runs["dense"]["times"]) if "dense" in runs else None
    print("| variant |" + (" params (M) |" if params else "") +
          " time (ms) | vs dense | dropped | compile (s) |")
    print("|---|" + ("---:|" if params else "") + "---:|---:|---:|---:|")
    for name, r in runs.items():
        t = float(np.median(r["times"]))
        ratio = f"{t / ref:.2f}x" if ref else "-"
        dropped = float(r["metrics"].get("moe_dropped_frac", 0.0))
        print(f"| {rows[name][0]} |" + (f" {r['params'] / 1e6:.2f} |" if params else "") +
              f" {t * 1e3:.1f} | {ratio} | {dropped:.1%} | {r['compile_s']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/configs/tiny.yaml")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--expert-dim", type=int, default=None, help="default: the config's mlp_dim")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", nargs="*", default=["dense", "blocks", "ragged_dot", "capacity"],
                   help="subset of: dense blocks ragged_dot capacity")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.n_layers=4")
    args = p.parse_args(argv)

    base = [f"data.seq_len={args.seq_len}", "data.task=copy", *args.overrides]
    F = args.expert_dim or load_config(args.config, base).model.mlp_dim
    moe = [f"model.moe.num_experts={args.experts}", f"model.moe.num_experts_per_tok={args.k}",
           f"model.moe.expert_dim={F}"]
    variants = {
        "dense": (f"dense, mlp_dim = k * expert_dim = {args.k * F}",
                  [f"model.mlp_dim={args.k * F}"]),
        "blocks": ("MoE dropless, blocks grouped matmul",
                   moe + ["model.moe.dropless_impl=blocks"]),
        "ragged_dot": ("MoE dropless, jax.lax.ragged_dot",
                       moe + ["model.moe.dropless_impl=ragged_dot"]),
        "capacity": (f"MoE capacity, factor {args.capacity_factor} (GShard one-hot)",
                     moe + [f"model.moe.capacity_factor={args.capacity_factor}"]),
    }
    rows = {name: variants[name] for name in args.rows}

    cfg0 = load_config(args.config, base)
    mc = cfg0.model
    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq_len
    batch = {"tokens": jnp.asarray(rng.integers(0, mc.vocab_size, (B, T)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, mc.vocab_size, (B, T)), jnp.int32),
             "loss_mask": jnp.ones((B, T), jnp.float32)}

    runs = {name: _step(load_config(args.config, base + over), batch)
            for name, (_, over) in rows.items()}
    _time(runs, batch, args.repeats)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, mc.d_model), jnp.float32)
    layers = {name: _layer_step(load_config(args.config, base + over), x)
              for name, (_, over) in rows.items()}
    _time(layers, None, args.repeats)

    print(f"device: {jax.devices()[0].device_kind} ({jax.device_count()} devices), "
          f"jax {jax.__version__}")
    print(f"model: {args.config} d_model={mc.d_model} n_layers={mc.n_layers}; batch {B} x {T} "
          f"tokens; E={args.experts} k={args.k} expert_dim={F}; blocks of "
          f"{default_block_size(B * T * args.k, args.experts)} rows; median of {args.repeats} "
          "interleaved calls\n")
    print("Training step (make_train_step: fwd + bwd + AdamW):\n")
    _table(runs, rows)
    print(f"\nFeed-forward layer alone (fwd + bwd), {B * T} tokens x d_model={mc.d_model}:\n")
    _table(layers, rows, params=False)


if __name__ == "__main__":
    main()
