"""Benchmark: the accelerator kernels against the pure-JAX forms they replace (fwd+bwd).

    python -m experiments.bench_kernels                 # CPU: small sizes, see below
    python -m experiments.bench_kernels --lengths 4096 16384 65536 --dtype bfloat16  # GPU/TPU
    python -m experiments.bench_kernels --target v5p-8 --compile-only  # compile-only devices

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

``--target T --compile-only`` compiles each Pallas linear kernel (linear attention with
no / scalar / per-key gate; the delta rule with a scalar gate (DeltaNet's ``g=None``
runs the same kernel) and a per-key gate (KDA)), forward + backward through
``longctx.ops`` (``form="pallas"``), for compile-only devices of the target, at B = 1,
H = 8, every ``--lengths`` x ``--head-dims`` x ``--dtypes``, and prints per row: compiles
or the compiler's message, the VMEM each of the two Mosaic kernels uses *as the TPU
compiler reports it* (``used_scoped_memory_configs`` in the compiled HLO, less the
offset XLA placed the kernel's range at), the ``vmem_limit_bytes`` the kernel set, the
whole program's HBM temporaries (``memory_analysis().temp_size_in_bytes``; in brackets
as a multiple of the bytes of q, k, v), and the compile seconds (the whole fwd+bwd program: the WY factors of the delta rule in XLA
dominate its time). For a GPU target (``--target h100``) the row shows the two Pallas
Triton calls' launch (grid, warps, stages) instead of VMEM: the compiled program keeps
no shared-memory figure (XLA sizes it in its own codegen and reports it only when it is
too much, as the compiler's error). No timings: nothing runs. A refusal whose arguments
and their gradients alone exceed the chip's memory says so (no implementation fits it).
Past a slab (``longctx.kernels.linear_attention.slab_of``) the kernels run once more per
slab (the backward's recompute); the row checks each named kernel is there.
"""

from __future__ import annotations

import argparse
import math
import re
import time

import jax
import jax.numpy as jnp
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longctx import targets
from longctx.backends.full import ops as full
from longctx.backends.linear import ops as linear
from longctx.kernels import delta_rule as pallas_delta
from longctx.kernels import linear_attention as pallas_linear
from longctx.kernels import splash_attention as splash
from longctx.moe import ops as moe
from longctx.train.metrics import median_time


def _grad_of(f, n_args):
    """``f``'s forward + backward: the jitted gradient of ``sum(f(...)**2)`` in its first
    ``n_args`` arguments (the timed rows)."""
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
        new = _grad_of(lambda q, k, v: splash.splash_attention(q, k, v, interpret=interp), 3)
        base = _grad_of(lambda q, k, v: full.attention(q, k, v, impl="flash"), 3)
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
            new = _grad_of(lambda q, k, v, g: pallas_linear.linear_attention(
                q, k, v, g=g, chunk_size=C, interpret=interp), 4)
            base = _grad_of(lambda q, k, v, g: linear.linear_attention(
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
            new = _grad_of(lambda q, k, v, g, beta: pallas_delta.delta_rule(
                q, k, v, beta, g=g, chunk_size=C, interpret=interp), 5)
            base = _grad_of(lambda q, k, v, g, beta: linear.delta_rule(
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
            return _grad_of(lambda x, wg, wu, wd, e, wt: moe.dropless_moe(
                x, e, wt, wg, wu, wd, impl=impl), 4)

        t_new = median_time(run("ragged_dot"), x, *w, experts, weights, repeats=args.repeats)
        t_base = median_time(run("blocks"), x, *w, experts, weights, repeats=args.repeats)
        _row(f"MoE ragged_dot vs blocks (E={E} k={k} d={D} f={F})", N, t_new, t_base,
             f"tokens; {jax.default_backend()}")


# the two walks' pallas_call names, forward first (chunk_grid, chunk_triton)
MOSAIC_KERNELS = ("chunk_fwd_mosaic", "chunk_bwd_mosaic")
TRITON_KERNELS = ("chunk_fwd_triton", "chunk_bwd_triton")
COMPILE_KERNELS = [("linear_attention", "none"), ("linear_attention", "scalar"),
                   ("linear_attention", "per_key"), ("delta_rule", "scalar"),
                   ("delta_rule", "per_key")]


def mosaic_kernels(hlo):
    """``{kernel name: (VMEM used, VMEM limit)}`` bytes of the Mosaic kernels in a compiled
    TPU HLO text, as the compiler reports them: the end of each call's used scoped range
    less the offset XLA placed its range at, and the range's size (the largest over the
    calls of one kernel: a kernel runs more than once in slabs). The name is the
    ``pallas_call``'s (``op_name`` metadata); ``"?"`` where it has none."""
    out = {}
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        name = re.search(r'op_name="[^"]*?/([^/"]+)/pallas_call"', line)
        cfg = re.search(r'"scoped_memory_configs":\[\{"memory_space":"1","offset":"(\d+)",'
                        r'"size":"(\d+)"', line)
        used = re.search(r'"used_scoped_memory_configs":\[\{"memory_space":"1",'
                         r'"offset":"\d+","size":"(\d+)"', line)
        key = re.sub(r"^(?:\w+\()+|\)+$", "", name.group(1)) if name else "?"  # jvp(..)
        vm = ((int(used.group(1)) - int(cfg.group(1)), int(cfg.group(2))) if cfg and used
              else (0, 0))
        out[key] = max(out.get(key, vm), vm)
    return out


def _triton_launches(hlo):
    """``[(kernel name, grid, num_warps, num_stages)]`` of the Pallas Triton calls in a
    compiled GPU HLO text: what the program records of them. Their shared memory is not
    there: XLA compiles the Triton IR (kept in the call's ``backend_config``) to PTX in
    its own codegen and sizes the launch then."""
    out = []
    for line in hlo.splitlines():
        if 'custom_call_target="__gpu$xla.gpu.triton"' not in line:
            continue
        field = {k: re.search(rf"{k} = (\S+?)[ ,}}]", line) for k in
                 ("grid_x", "grid_y", "grid_z", "num_warps", "num_stages")}
        name = re.search(r'name = "([^"]+)"', line)
        val = {k: (m.group(1).strip('"') if m else "?") for k, m in field.items()}
        out.append((name.group(1) if name else "?",
                    f"{val['grid_x']}x{val['grid_y']}x{val['grid_z']}",
                    val["num_warps"], val["num_stages"]))
    return out


def fwd_bwd(op, gate, T, K, dtype, mesh, *, heads=8, chunk_size=None, batch=1):
    """``op``'s forward + backward (``form="pallas"``, through ``longctx.ops``) as one jitted
    gradient of every float input (q, k, v, the gate, beta), and its abstract arguments;
    the caller lowers it under ``mesh`` (this bench, tests/test_kernels_*.py).

    The ``[B, T, H, K]`` arguments (q, k, v, per-key gates) and their gradients are pinned
    to the row-major layout, replicated over ``mesh``: the layout the op slices (inside a
    model's program XLA lays out the projections that produce them to suit). Left to the
    device default, TPU lays out ``[B, T, H, 64]`` with T minor (a 64-wide minor dim would
    take 128 lanes) and the program pays a relayout of q, k, v and of their gradients
    (docs/results/kernels_tpu.md, "Slabs"). The ``[B, T, H]`` gates and beta keep the
    device default (T minor, dense): row-major they would take 128 lanes for their 8
    heads, 16x their bytes."""
    C = chunk_size or (16 if gate == "per_key" else 64)
    B, H = batch, heads
    sd = jax.ShapeDtypeStruct
    args = [sd((B, T, H, K), dtype)] * 3
    if gate != "none":
        args.append(sd((B, T, H) if gate == "scalar" else (B, T, H, K), jnp.float32))
    args.append(sd((B, T, H), dtype))

    def loss(q, k, v, *rest):
        g, beta = (None, *rest) if gate == "none" else rest
        if op == "linear_attention":
            o, _ = linear.linear_attention(q, k, v, g=g, chunk_size=C, form="pallas")
        else:
            o, _ = linear.delta_rule(q, k, v, beta, g=g, chunk_size=C, form="pallas")
        return jnp.sum(o.astype(jnp.float32) ** 2)

    rep = NamedSharding(mesh, P())
    fmt = [Format(Layout(tuple(range(4))), rep) if len(a.shape) == 4 else rep for a in args]
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))), in_shardings=fmt,
                   out_shardings=tuple(fmt)), args


def compile_one(op, gate, T, K, dtype, mesh, heads=8, chunk_size=None):
    """Compile ``op`` fwd+bwd (``form="pallas"``) under ``mesh``: a result dict."""
    B, H = 1, heads
    step, args = fwd_bwd(op, gate, T, K, dtype, mesh, heads=heads, chunk_size=chunk_size)
    # the floor of any implementation: the arguments and their gradients (the outputs)
    io = 2 * sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in args)
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = step.lower(*args).compile()
            hlo = compiled.as_text()
    except Exception as e:  # noqa: BLE001 -- the row reports the compiler's message
        msg = " ".join(str(e).split())
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": msg[:240],
                "io": io}
    mem = compiled.memory_analysis()
    return {"ok": True, "seconds": time.perf_counter() - t0, "mosaic": mosaic_kernels(hlo),
            "io": io,
            "triton": _triton_launches(hlo),
            "temp": mem.temp_size_in_bytes if mem is not None else None,
            "inputs": 3 * B * T * H * K * jnp.dtype(dtype).itemsize}


def compile_table(args):
    target = targets.parse(args.target)
    devs = targets.devices(target)
    mesh = jax.make_mesh((1,), ("x",), devices=devs[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    gpu = target.platform == "gpu"
    print(f"target: {target.name} ({devs[0].device_kind}), compile-only, jax {jax.__version__}; "
          f"B=1 H={args.compile_heads}, C=64 (per-key gates C=16); fwd+bwd through longctx.ops")
    if gpu:
        print("| kernel | gate | T | head_dim | dtype | compiles (2 Triton calls) | launch fwd / bwd "
              "(grid, warps, stages) | shared memory | HBM temporaries (x q,k,v) | compile s |")
    else:
        print("| kernel | gate | T | head_dim | dtype | compiles | VMEM fwd / bwd (compiler) "
              "| vmem_limit | HBM temporaries (x q,k,v) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for op, gate in COMPILE_KERNELS:
        if args.kernels and f"{op}:{gate}" not in args.kernels:
            continue
        for T in args.lengths:
            for K in args.head_dims:
                for dt in args.dtypes:
                    r = compile_one(op, gate, T, K, jnp.dtype(dt), mesh, heads=args.compile_heads)
                    if not r["ok"]:
                        floor = (f" (its arguments and their gradients alone are "
                                 f"{r['io'] / 2**30:.1f} GiB: more than the chip's "
                                 f"{target.chip.memory_bytes / 2**30:.1f} GiB)"
                                 if target.chip and r["io"] > target.chip.memory_bytes else "")
                        cells = [f"no: {r['error']}{floor}", "-", "-", "-"]
                    else:
                        hbm = (f"{r['temp'] / 2**30:.2f} GiB ({r['temp'] / r['inputs']:.1f}x)"
                               if r["temp"] is not None else "not reported")
                        if gpu:
                            launches = {n: f"{g}, {w}, {st}" for n, g, w, st in r["triton"]}
                            ok = ("yes" if sorted(launches) == sorted(TRITON_KERNELS)
                                  else f"NO TRITON KERNELS ({sorted(launches)})")
                            launch = " / ".join(launches.get(k, "-") for k in TRITON_KERNELS)
                            cells = [ok, launch, "not in the program", hbm]
                        else:
                            names = sorted(r["mosaic"])
                            ok = ("yes" if names == sorted(MOSAIC_KERNELS)
                                  else f"NO MOSAIC KERNELS ({names})")
                            vm = " / ".join(f"{r['mosaic'][k][0] / 2**20:.2f} MiB"
                                            for k in MOSAIC_KERNELS if k in r["mosaic"])
                            lim = " / ".join(f"{r['mosaic'][k][1] / 2**20:.0f}"
                                             for k in MOSAIC_KERNELS if k in r["mosaic"]) + " MiB"
                            cells = [ok, vm, lim, hbm]
                    print(f"| {op} | {gate} | {T} | {K} | {dt} | {' | '.join(cells)} | "
                          f"{r['seconds']:.1f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256])
    p.add_argument("--moe-tokens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", default=["attention", "linear", "moe"])
    p.add_argument("--target", help="compile for this target (v5p-8, v5e-4, v6e-4, ...)")
    p.add_argument("--compile-only", action="store_true",
                   help="with --target: the compile table (no timings)")
    p.add_argument("--compile-heads", type=int, default=8, help="heads in the compile table")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--kernels", nargs="*", default=[],
                   help="op:gate rows to keep (e.g. linear_attention:scalar); default all")
    args = p.parse_args(argv)
    if args.target:
        if not args.compile_only:
            p.error("--target runs nothing on the target: pass --compile-only")
        targets.compile_only()
        if args.lengths == [256]:
            args.lengths = [8192, 32768, 131072]
        compile_table(args)
        return
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
