"""The speed / memory / quality frontier across context lengths.

    python -m experiments.context_sweep                          # flash xla linear hybrid recurrent, 1K .. 1M
    python -m experiments.context_sweep --backends all           # + gated_deltanet, moe, new backends
    python -m experiments.context_sweep --backends flash xla --lengths 1024 4096 --out runs/sweep
    python -m experiments.context_sweep --task passkey --train-steps 200 --lengths 256 1024
    python -m experiments.context_sweep --task ruler --train-steps 300 --lengths 256 1024 4096
    python -m experiments.context_sweep --task niah_single --backends flash hybrid \
        --run-dir flash=runs/a hybrid=runs/b --lengths 256 4096     # evaluate existing runs

For each backend x context length it builds the model of ``--config`` (batch
``--batch``), compiles one training step (the trainer's own
``make_train_step``), and records compile time, the median step time over
``--repeats`` steps, tokens/s, achieved FLOP/s and MFU, and the compiled scratch
memory (``memory_analysis().temp_size_in_bytes``, plus peak device memory on
GPU/TPU). Before compiling a length it predicts scratch memory and step time
from the smaller lengths (log-log fit) and skips what would exceed
``--budget-gb`` (status ``oom-predicted``) or ``--time-budget-s``
(``time-predicted``) rather than crash or stall the machine; a compiled step
whose scratch exceeds the budget is ``oom`` without running, and a real
out-of-memory is caught as ``oom``. Rows already in ``results.jsonl`` are not
measured again (resumable).

Quality axis (``--task``, any synthetic task: ``ruler`` is the RULER mixture, or one of
its tasks, ``mqar``, ``passkey``): each backend is trained once, ``--train-steps`` steps
at ``--train-len`` (default the shortest length), or taken from ``--run-dir
BACKEND=RUN``, and evaluated at every length of the sweep on held-out examples
(train short, test long): token ``accuracy``, ``exact_match`` and the answer's mean
log-probability (``longctx.evals.ruler.task_eval``).

Outputs in ``--out``: ``results.jsonl`` (one row per backend x length),
``results.md`` (a table), ``frontier.png`` (log-log step time and memory vs
length per backend with the memory budget as a line; a quality panel when
``--task`` is given).

Backends: named overlays (``SPECS``) plus every backend registered in
``longctx.model.registry.BACKENDS`` that no overlay names yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from longctx.config import ConfigError, load_config
from longctx.data import synthetic
from longctx.evals.core import load_model
from longctx.evals.ruler import task_eval
from longctx.model import build_model
from longctx.model.registry import BACKENDS
from longctx.train import make_optimizer, make_train_step, train
from longctx.train import metrics as M

# Named backend overlays: what each row of the frontier means.
SPECS = {
    "flash": ["model.attention.backend=full", "model.attention.impl=flash"],
    "xla": ["model.attention.backend=full", "model.attention.impl=xla"],
}
# Linear / recurrent variants appear here once registered (see default_specs()).
OPTIONAL_SPECS = {
    # beyond 16K tokens trained in 16K-token segments carrying the recurrent state, with
    # exact gradients (bptt_segments 0: the carried state is [H, K, V] per layer), so
    # memory stops growing at 16K (the whole-sequence chunk form needs ~26 KB/token)
    "linear": ["model.attention.backend=linear", "model.attention.linear.variant=linear",
               "model.segment_len=16384"],
    "gated_deltanet": ["model.attention.backend=linear",
                       "model.attention.linear.variant=gated_deltanet"],
    # segments of 256 carrying a one-segment XL cache and a compressive memory; gradients
    # window by window (bptt 2), so training memory does not grow with the length
    "recurrent": ["model.attention.backend=recurrent", "model.segment_len=256",
                  "model.bptt_segments=2", "model.attention.recurrent.cache_segments=1",
                  "model.attention.recurrent.compressive=delta"],
    "moe": ["model.attention.backend=full", "model.attention.impl=flash",
            "model.moe.num_experts=8"],
    # the 10K -> 100K regime as today's long-context models build it (Qwen3-Next, Kimi
    # Linear): 3 gated DeltaNet layers to 1 flash layer, so 4 layers (the other rows have 2)
    "hybrid": ["model.attention.pattern=[linear, linear, linear, full]",
               "model.attention.linear.variant=gated_deltanet", "model.attention.impl=flash",
               "model.n_layers=4"],
}
DEFAULT_LENGTHS = [1024, 4096, 16384, 65536, 262144, 1048576]
# The default run: one row per regime of the roadmap, under 10 minutes on a 2-core CPU.
# `--backends all` adds every other named spec (gated_deltanet, moe, new registrations).
DEFAULT_BACKENDS = ["flash", "xla", "linear", "hybrid", "recurrent"]
FIELDS = ("backend", "length", "status", "message", "compile_s", "step_s", "tokens_per_s",
          "tflops_per_s", "mfu", "scratch_bytes", "peak_bytes", "task", "train_len", "accuracy",
          "exact_match", "answer_logprob", "device_kind", "jax_version", "overrides")


def default_specs() -> dict[str, list[str]]:
    specs = dict(SPECS)
    for name, ov in OPTIONAL_SPECS.items():
        try:
            load_config(None, ov)
        except ConfigError:
            continue  # e.g. a backend or variant not available in this build
        specs[name] = ov
    for backend in BACKENDS:  # new registrations show up without editing this file
        if not any(o == f"model.attention.backend={backend}" for ov in specs.values() for o in ov):
            specs[backend] = [f"model.attention.backend={backend}"]
    return specs


def fit_predict(xs, ys, x):
    """Log-log linear fit through the last two points (the local slope), evaluated at x."""
    pts = [(a, b) for a, b in zip(xs, ys) if b and b > 0]
    if len(pts) < 2:
        return None
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    slope = math.log(y1 / y0) / math.log(x1 / x0)
    return y1 * (x / x1) ** max(slope, 1.0)


def measure(cfg, *, batch, repeats, budget_bytes, long_step_s=5.0):
    """Compile and time one training step of ``cfg`` at ``cfg.data.seq_len``.

    The median of ``repeats`` steps after one warm-up step. A step whose first call
    takes longer than ``long_step_s`` is timed by that call alone, so that the default
    ladder fits its 10 minutes: an upper bound, as it includes one-off costs (first-touch
    allocation), which at that size are small (flash at 64K on CPU: 48.8 s first call,
    49.2 s median of later calls). ``--long-step-s inf`` times those points like the others.
    """
    mc, T = cfg.model, cfg.data.seq_len
    model = build_model(mc, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(cfg.optim, 100), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    n_params, n_active = M.active_params(mc, nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    b = {"tokens": jnp.asarray(rng.integers(0, mc.vocab_size, (batch, T)), jnp.int32),
         "targets": jnp.asarray(rng.integers(0, mc.vocab_size, (batch, T)), jnp.int32),
         "loss_mask": jnp.ones((batch, T), jnp.float32)}
    step = jax.jit(make_train_step(graphdef, 1), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    scratch = compiled.memory_analysis().temp_size_in_bytes
    row = {"compile_s": compile_s, "scratch_bytes": scratch}
    if scratch > budget_bytes:
        return {**row, "status": "oom",
                "message": f"compiled scratch {scratch / 2**30:.1f} GiB > budget"}
    times = []
    for i in range(repeats + 1):  # the first run is a warm-up
        t0 = time.perf_counter()
        state, metrics = compiled(state, b)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        if times[0] > long_step_s:
            break
    dt = float(np.median(times[1:] or times))
    flops = M.train_flops_per_step(model, n_active, batch=batch, seq_len=T)
    peak, _ = M.peak_flops()
    return {**row, "status": "ok", "step_s": dt, "tokens_per_s": batch * T / dt,
            "tflops_per_s": flops / dt / 1e12, "mfu": flops / dt / peak,
            "peak_bytes": M.device_peak_memory()}


def train_run(config, overrides, run_dir, *, steps, seed=0):
    """Train a fresh run of ``config`` + ``overrides`` for ``steps`` into ``run_dir``."""
    cfg = load_config(config, [*overrides, f"train.run_dir={run_dir}", f"train.steps={steps}",
                               f"train.seed={seed}", f"data.seed={seed}", "train.eval_every=0",
                               "train.tensorboard=false", "checkpoint.resume=false",
                               "checkpoint.every_steps=0", "checkpoint.async_save=false",
                               f"optim.warmup_steps={max(steps // 10, 1)}"])
    train(cfg, progress=False)
    return run_dir


class Quality:
    """The quality axis: each backend trained once at ``train_len`` on ``task`` (or an existing
    run from ``--run-dir``), then evaluated at every length of the sweep (train short, test long)."""

    def __init__(self, args, specs):
        self.args, self.specs, self.models = args, specs, {}
        self.train_len = args.train_len or min(args.lengths)
        self.runs = dict(args.run_dir or {})

    def __call__(self, name, L):
        a = self.args
        if name not in self.models:
            run = self.runs.get(name)
            if run is None:
                run = train_run(a.config, [*self.specs[name], *a.overrides, f"data.task={a.task}",
                                           f"data.seq_len={self.train_len}",
                                           f"model.max_seq_len={max(self.train_len, 1024)}"],
                                os.path.join(a.out, "runs", f"{name}-train{self.train_len}"),
                                steps=a.train_steps)
            self.models[name] = load_model(run, max_len=max(a.lengths))
        cfg, model, _ = self.models[name]
        return {"task": a.task, "train_len": cfg.data.seq_len,
                **task_eval(model, cfg, a.task, length=L, examples=a.eval_examples)}


def write_table(rows, path):
    cols = ["backend", "length", "status", "step_s", "tokens_per_s", "mfu", "scratch_MiB",
            "compile_s", "accuracy", "exact_match", "answer_logprob"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["backend"], r["length"])):
        cells = []
        for c in cols:
            v = r.get("scratch_bytes") / 2**20 if c == "scratch_MiB" and r.get("scratch_bytes") \
                else r.get(c)
            if isinstance(v, float):
                v = f"{v:.3g}"
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows, path, budget_bytes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_q = any(r.get("accuracy") is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if has_q else 2, figsize=(15 if has_q else 10, 4.2))
    for name in sorted({r["backend"] for r in rows}):
        ok = sorted((r for r in rows if r["backend"] == name and r["status"] == "ok"),
                    key=lambda r: r["length"])
        if ok:
            L = [r["length"] for r in ok]
            axes[0].plot(L, [r["step_s"] for r in ok], "o-", label=name)
            axes[1].plot(L, [r["scratch_bytes"] / 2**20 for r in ok], "o-", label=name)
        if has_q:
            q = [r for r in ok if r.get("accuracy") is not None]
            if q:
                line, = axes[2].plot([r["length"] for r in q],
                                     [r.get("exact_match", r["accuracy"]) for r in q], "o-",
                                     label=f"{name} exact match")
                axes[2].plot([r["length"] for r in q], [r["accuracy"] for r in q], "x--",
                             color=line.get_color(), lw=0.8, label=f"{name} token accuracy")
                if q[0].get("train_len"):
                    axes[2].axvline(q[0]["train_len"], color="k", ls=":", lw=0.8)
    axes[1].axhline(budget_bytes / 2**20, color="k", ls="--", lw=1, label="memory budget")
    tasks = sorted({r["task"] for r in rows if r.get("task")})
    quality_title = f"quality: {', '.join(tasks)} (trained at the dotted length)"
    titles = ["train step time (s)", "compiled scratch memory (MiB)", quality_title]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        if title != quality_title:
            ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"longctx frontier on {jax.devices()[0].device_kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=DEFAULT_BACKENDS,
                   help=f"named specs, or 'all' (default: {' '.join(DEFAULT_BACKENDS)})")
    p.add_argument("--lengths", nargs="+", type=int, default=DEFAULT_LENGTHS)
    p.add_argument("--config", default="experiments/configs/sweep.yaml")
    p.add_argument("--out", default="runs/context_sweep")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed steps (after one warm-up)")
    p.add_argument("--budget-gb", type=float, default=8.0, help="scratch memory budget")
    p.add_argument("--long-step-s", type=float, default=5.0,
                   help="a step whose first call exceeds this is timed by that call alone")
    p.add_argument("--time-budget-s", type=float, default=120.0,
                   help="skip a length whose predicted step time exceeds this")
    p.add_argument("--task", choices=sorted(synthetic.TASKS), default=None,
                   help="quality axis: train each backend at --train-len on this task (ruler: "
                        "the RULER mixture) and evaluate it at every length")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--train-len", type=int, default=None,
                   help="quality: training length (default: the shortest length)")
    p.add_argument("--eval-examples", type=int, default=16, help="quality: examples per length")
    p.add_argument("--run-dir", nargs="+", default=None, metavar="BACKEND=RUN",
                   help="quality: evaluate these trainer runs instead of training")
    p.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = p.parse_args(argv)

    if args.run_dir:
        bad = [r for r in args.run_dir if "=" not in r]
        if bad or not args.task:
            p.error(f"--run-dir takes BACKEND=RUN pairs and needs --task (got {args.run_dir})")
        args.run_dir = dict(r.split("=", 1) for r in args.run_dir)
    specs = default_specs()
    names = list(specs) if args.backends == ["all"] else args.backends
    unknown = [n for n in names if n not in specs]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; available: {sorted(specs)}")
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    rows = [json.loads(l) for l in open(results_path)] if os.path.exists(results_path) else []
    done = {(r["backend"], r["length"]) for r in rows}
    budget = args.budget_gb * 2**30
    lengths = sorted(args.lengths)
    todo = [(n, L) for n in names for L in lengths if (n, L) not in done]
    print(f"device: {jax.devices()[0].device_kind}; {len(todo)} points to measure, "
          f"{len(done)} already in {results_path}")

    quality = Quality(args, specs) if args.task else None
    with tqdm(todo, desc="sweep", dynamic_ncols=True) as bar:
        for name, L in bar:
            bar.set_postfix(backend=name, length=L)
            prev = sorted((r for r in rows if r["backend"] == name and r["status"] == "ok"),
                          key=lambda r: r["length"])
            overrides = [*specs[name], *args.overrides, f"data.seq_len={L}",
                         f"model.max_seq_len={max(L, 1024)}",
                         f"train.run_dir={os.path.join(args.out, 'runs', f'{name}-{L}')}"]
            row = {"backend": name, "length": L, "device_kind": jax.devices()[0].device_kind,
                   "jax_version": jax.__version__, "overrides": overrides}
            failed_before = [r for r in rows if r["backend"] == name and r["length"] < L
                             and r["status"] in ("oom", "oom-predicted", "time-predicted")]
            mem_pred = fit_predict([r["length"] for r in prev], [r["scratch_bytes"] for r in prev], L)
            time_pred = fit_predict([r["length"] for r in prev], [r["step_s"] for r in prev], L)
            if failed_before:
                row.update(status=failed_before[-1]["status"],
                           message=f"a shorter length ({failed_before[-1]['length']}) already "
                                   f"exceeded the budget")
            elif mem_pred is not None and mem_pred > budget:
                row.update(status="oom-predicted",
                           message=f"predicted scratch {mem_pred / 2**30:.1f} GiB > "
                                   f"{args.budget_gb} GiB")
            elif time_pred is not None and time_pred > args.time_budget_s:
                row.update(status="time-predicted",
                           message=f"predicted step {time_pred:.0f} s > {args.time_budget_s} s")
            else:
                try:
                    cfg = load_config(args.config, overrides)
                    row.update(measure(cfg, batch=args.batch, repeats=args.repeats,
                                       budget_bytes=budget, long_step_s=args.long_step_s))
                    if quality is not None and row["status"] == "ok":
                        row.update(quality(name, L))
                except Exception as e:  # noqa: BLE001 -- recorded in the row, sweep goes on
                    oom = "RESOURCE_EXHAUSTED" in str(e) or isinstance(e, MemoryError)
                    row.update(status="oom" if oom else "error",
                               message=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    if not oom:
                        traceback.print_exc()
            rows.append(row)
            with open(results_path, "a") as f:
                f.write(json.dumps({k: row.get(k) for k in FIELDS}) + "\n")
            write_table(rows, os.path.join(args.out, "results.md"))
    write_table(rows, os.path.join(args.out, "results.md"))
    plot(rows, os.path.join(args.out, "frontier.png"), budget)
    print(open(os.path.join(args.out, "results.md")).read())
    return rows


if __name__ == "__main__":
    main()
