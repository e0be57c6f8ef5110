"""The speed / memory / quality frontier across context lengths.

    python -m experiments.context_sweep                          # flash xla linear hybrid recurrent, 1K .. 1M
    python -m experiments.context_sweep --backends all           # + gated_deltanet, moe, new backends
    python -m experiments.context_sweep --backends flash xla --lengths 1024 4096 --out runs/sweep
    python -m experiments.context_sweep --task passkey --train-steps 200 --lengths 256 1024
    python -m experiments.context_sweep --task ruler --train-steps 300 --lengths 256 1024 4096
    python -m experiments.context_sweep --task niah_single --backends flash hybrid \
        --run-dir flash=runs/a hybrid=runs/b --lengths 256 4096     # evaluate existing runs
    python -m experiments.context_sweep --mesh sequence=8 --backends flash   # 8 devices
    python -m experiments.context_sweep --target v5p-8 --compile-only \
        --config experiments/configs/model_1b.yaml --batch 4 --lengths 8192 32768   # a TPU slice

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

Context parallelism (``--mesh sequence=8``, or ``data=2,sequence=4``): the step is
compiled over that mesh (``mesh.ici``) with the trainer's shardings, so the sequence is
split over ``sequence`` (``model.attention.context_parallel: auto``: the zigzag ring for
``full`` layers, state passing for ``linear`` ones; the recurrent backend refuses a split
sequence and its rows are ``error``). ``scratch_bytes`` is then *per device* (the SPMD
program's ``memory_analysis``), ``--budget-gb`` a per-device budget, and the row records
``mesh`` and ``devices``; rows of different meshes live side by side in one ``--out``
(resume keys on backend x mesh x length). On CPU, ``python -m experiments.context_sweep``
asks XLA for as many simulated host devices as the mesh needs
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before JAX starts); a process
whose JAX already started with fewer devices gets an error saying so. The simulated
devices share the host's cores, so step times on them are no speed-up; per-device memory
is what they show.

Targets (``--target v5p-8 --compile-only``, any name ``python -m longctx.compile`` takes):
every point is compiled for that hardware from this machine (compile-only TPU / GPU
devices, ``longctx.compile.compile_step``: the trainer's own step and shardings, the
target's automatic choices) and never run. Rows gain ``target``, ``device_bytes`` (argument
+ output + temp - alias, per device), ``memory_bytes``, ``fits`` and ``roofline_step_s`` (the
model's FLOPs at the target's peak: a roofline, labelled so); ``--budget-gb`` defaults to the
target's memory and ``--time-budget-s`` applies to the roofline. A point *counts* (status
``compiled``) when it fits and its roofline step is within the time budget; ``oom`` when
it does not fit (the compiler's refusal included), ``slow`` when its roofline is over.
The table and the plot are labelled with the target.

Backends: named overlays (``SPECS``) plus every backend registered in
``longctx.model.registry.BACKENDS`` that no overlay names yet; with ``--target``,
``TARGET_SPECS`` replace some of them (``full``: the target's own attention kernel; the
hybrid at the config's depth; see there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback


# jax is imported by these but no backend starts before the XLA_FLAGS below are set
from longctx.compile import parse_mesh as compile_parse_mesh  # noqa: E402


def parse_mesh(spec: str | None) -> dict[str, int]:
    """``"sequence=8"`` / ``"data=2,sequence=4"`` -> ``{axis: size}`` (``{}`` for None)."""
    return compile_parse_mesh(spec, allow_rest=False)


def _mesh_devices(argv) -> int:
    """Devices the ``--mesh`` of ``argv`` needs (1 without one; 0 if it does not parse)."""
    for i, a in enumerate(argv):
        spec = a.split("=", 1)[1] if a.startswith("--mesh=") else (
            argv[i + 1] if a == "--mesh" and i + 1 < len(argv) else None)
        if spec is not None:
            try:
                return math.prod(parse_mesh(spec).values())
            except ValueError:
                return 0  # argparse reports it
    return 1


if __name__ == "__main__":  # before JAX starts: simulated CPU devices for --mesh
    _n = _mesh_devices(sys.argv[1:])
    if _n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={_n}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from longctx import targets  # noqa: E402
from longctx.compile import compile_step  # noqa: E402
from longctx.config import ConfigError, load_config  # noqa: E402
from longctx.data import synthetic  # noqa: E402
from longctx.evals.core import load_model  # noqa: E402
from longctx.evals.ruler import task_eval  # noqa: E402
from longctx.model import build_model  # noqa: E402
from longctx.model.registry import BACKENDS  # noqa: E402
from longctx.parallel import sharding as shd  # noqa: E402
from longctx.train import make_optimizer, make_train_step, train  # noqa: E402
from longctx.train import metrics as M  # noqa: E402
from longctx.train.state import TrainState  # noqa: E402

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
# With --target the overlays describe a real model shape (the --config's depth and widths)
# on that hardware, so they override these of the CPU rows: exact attention by the target's
# own kernel (impl auto: splash on TPU, cuDNN on GPU) as well as flash, the hybrid keeping
# the config's depth (16 = 4 groups of 3 gated DeltaNet : 1 exact), and the recurrent backend
# in segments of 2048 (the CPU rows' 256 leave a TPU's matrix units idle).
TARGET_SPECS = {
    "full": ["model.attention.backend=full", "model.attention.impl=auto"],
    "hybrid": ["model.attention.pattern=[linear, linear, linear, full]",
               "model.attention.linear.variant=gated_deltanet", "model.attention.impl=auto"],
    "recurrent": ["model.attention.backend=recurrent", "model.segment_len=2048",
                  "model.bptt_segments=2", "model.attention.recurrent.cache_segments=1",
                  "model.attention.recurrent.compressive=delta", "model.attention.impl=auto"],
    "moe": ["model.attention.backend=full", "model.attention.impl=auto",
            "model.moe.num_experts=8"],
    # gated DeltaNet in 64K-token segments carrying the state, exact gradients (bptt 0):
    # the layer inputs kept for the backward pass and a layer's working set are one
    # segment's, not the sequence's (docs/results/frontier_targets.md: whole sequences stop
    # near 1M tokens per chip)
    "gated_deltanet_segments": ["model.attention.backend=linear",
                                "model.attention.linear.variant=gated_deltanet",
                                "model.segment_len=65536"],
}
DEFAULT_LENGTHS = [1024, 4096, 16384, 65536, 262144, 1048576]
# The default run: one row per regime of the roadmap, under 10 minutes on a 2-core CPU.
# `--backends all` adds every other named spec (gated_deltanet, moe, new registrations).
DEFAULT_BACKENDS = ["flash", "xla", "linear", "hybrid", "recurrent"]
FIELDS = ("backend", "target", "mesh", "devices", "length", "status", "message", "compile_s",
          "step_s", "device_bytes", "memory_bytes", "fits", "roofline_step_s",
          "tokens_per_s", "tflops_per_s", "mfu", "scratch_bytes", "peak_bytes", "task",
          "train_len", "accuracy", "exact_match", "answer_logprob", "device_kind", "jax_version",
          "overrides")


def default_specs(target: bool = False) -> dict[str, list[str]]:
    """The named overlays; ``target``: with :data:`TARGET_SPECS` over them (``--target``)."""
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
    return {**specs, **TARGET_SPECS} if target else specs


def fit_predict(xs, ys, x):
    """Log-log linear fit through the last two points (the local slope), evaluated at x."""
    pts = [(a, b) for a, b in zip(xs, ys) if b and b > 0]
    if len(pts) < 2:
        return None
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    slope = math.log(y1 / y0) / math.log(x1 / x0)
    return y1 * (x / x1) ** max(slope, 1.0)


def measure(cfg, *, batch, repeats, budget_bytes, long_step_s=5.0, mesh_shape=None,
            compile_only=False):
    """Compile and time one training step of ``cfg`` at ``cfg.data.seq_len``.

    The median of ``repeats`` steps after one warm-up step. A step whose first call
    takes longer than ``long_step_s`` is timed by that call alone, so that the default
    ladder fits its 10 minutes: an upper bound, as it includes one-off costs (first-touch
    allocation), which at that size are small (flash at 64K on CPU: 48.8 s first call,
    49.2 s median of later calls). ``--long-step-s inf`` times those points like the others.

    ``mesh_shape`` (``{axis: size}``): the step is compiled over that mesh of the first
    devices, state and batch placed as the trainer places them (``TrainState.create``,
    ``batch_sharding``), and ``scratch_bytes`` / ``budget_bytes`` are per device.
    ``compile_only``: stop after the compiled memory (status ``compiled``, no timing).
    """
    mc, T = cfg.model, cfg.data.seq_len
    rng = np.random.default_rng(0)
    b = {"tokens": rng.integers(0, mc.vocab_size, (batch, T)).astype(np.int32),
         "targets": rng.integers(0, mc.vocab_size, (batch, T)).astype(np.int32),
         "loss_mask": np.ones((batch, T), np.float32)}
    scope = contextlib.ExitStack()
    if mesh_shape:
        n_dev = math.prod(mesh_shape.values())
        mesh = shd.make_mesh(mesh_shape, devices=jax.devices()[:n_dev])
        rules = {**shd.DEFAULT_RULES, **cfg.mesh.rules}
        ts = TrainState.create(cfg, mesh, rules)
        graphdef, state, model, n_active = ts.graphdef, ts.state, ts.abstract_model, ts.n_active
        bsh = shd.batch_sharding(mesh, rules)
        b = {k: jax.device_put(v, bsh) for k, v in b.items()}
        step = jax.jit(make_train_step(graphdef, 1), in_shardings=(ts.sharding, bsh),
                       out_shardings=(ts.sharding, None), donate_argnums=0)
        scope.enter_context(jax.set_mesh(mesh))
        scope.enter_context(shd.activation_rules(mesh, rules))
    else:
        n_dev = 1
        model = build_model(mc, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, make_optimizer(cfg.optim, 100), wrt=nnx.Param)
        graphdef, state = nnx.split((model, opt))
        _, n_active = M.active_params(mc, nnx.state(model, nnx.Param))
        b = {k: jnp.asarray(v) for k, v in b.items()}
        step = jax.jit(make_train_step(graphdef, 1), donate_argnums=0)
    with scope:
        t0 = time.perf_counter()
        compiled = step.lower(state, b).compile()
        compile_s = time.perf_counter() - t0
        scratch = compiled.memory_analysis().temp_size_in_bytes
        row = {"compile_s": compile_s, "scratch_bytes": scratch}
        if scratch > budget_bytes:
            return {**row, "status": "oom",
                    "message": f"compiled scratch {scratch / 2**30:.1f} GiB > budget"}
        if compile_only:
            return {**row, "status": "compiled"}
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
    # simulated CPU devices share the host's cores: the host's rate is the peak of them all
    peak *= 1 if jax.devices()[0].platform == "cpu" else n_dev
    return {**row, "status": "ok", "step_s": dt, "tokens_per_s": batch * T / dt,
            "tflops_per_s": flops / dt / 1e12, "mfu": flops / dt / peak,
            "peak_bytes": M.device_peak_memory()}


def compile_for(cfg, target, *, budget_bytes, time_budget_s):
    """One point compiled for ``target`` (never run): the row fields of the module docstring."""
    r = compile_step(cfg, target)
    row = {k: r.get(k) for k in ("compile_s", "device_bytes", "memory_bytes", "fits",
                                 "roofline_step_s", "device_kind", "devices")}
    row["scratch_bytes"] = r["temp_bytes"]
    need = r["device_bytes"]
    if not r["fits"] or (need is not None and need > budget_bytes):
        what = r.get("refused") or f"{(need or 0) / 2**30:.1f} GiB per device"
        return {**row, "status": "oom", "message": f"does not fit: {what}"}
    if r["roofline_step_s"] > time_budget_s:
        return {**row, "status": "slow",
                "message": f"roofline step {r['roofline_step_s']:.0f} s > {time_budget_s} s"}
    return {**row, "status": "compiled"}


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
    """One row per backend x mesh x length; ``scratch_MiB_per_device`` is the compiled
    scratch of one device (the whole step's on one device, one shard's on a mesh)."""
    cols = ["backend", "devices", "length", "status", "step_s", "tokens_per_s", "mfu",
            "scratch_MiB_per_device", "compile_s", "accuracy", "exact_match", "answer_logprob"]
    if any(r.get("target") for r in rows):  # compiled for a target: memory and roofline
        cols = ["backend", "target", "devices", "length", "status", "GiB_per_device", "fits",
                "roofline_step_s", "compile_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["backend"], r.get("devices") or 1, r["length"])):
        cells = []
        for c in cols:
            v = r.get("scratch_bytes") / 2**20 if c == "scratch_MiB_per_device" \
                and r.get("scratch_bytes") else r.get(c)
            if c == "GiB_per_device" and r.get("device_bytes") is not None:
                v = r["device_bytes"] / 2**30
            if c == "devices":
                v = _devices_label(r)
            if isinstance(v, float):
                v = f"{v:.3g}"
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _devices_label(r):
    """``1``, or the mesh: ``8 (sequence=8)``."""
    return f"{r['devices']} ({r['mesh']})" if r.get("mesh") else str(r.get("devices") or 1)


def _series(r):
    """Plot series: the backend, with its mesh when it has one."""
    return f"{r['backend']} @ {r['mesh']}" if r.get("mesh") else r["backend"]


def plot(rows, path, budget_bytes, time_budget_s=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_q = any(r.get("accuracy") is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if has_q else 2, figsize=(15 if has_q else 10, 4.2))
    for name in sorted({_series(r) for r in rows}):
        ok = sorted((r for r in rows if _series(r) == name and (
            r["status"] == "ok" or r.get("roofline_step_s") and r.get("fits"))),
                    key=lambda r: r["length"])
        mem = sorted((r for r in rows if _series(r) == name  # over the time budget: shown
                      and (r["status"] in ("ok", "compiled") or r.get("fits"))),
                     key=lambda r: r["length"])
        if ok:
            axes[0].plot([r["length"] for r in ok],
                         [r.get("step_s") or r["roofline_step_s"] for r in ok], "o-", label=name)
        if mem:
            axes[1].plot([r["length"] for r in mem],
                         [(r.get("device_bytes") or r["scratch_bytes"]) / 2**20 for r in mem],
                         "o-", label=name)
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
    if time_budget_s and any(r.get("target") for r in rows):
        axes[0].axhline(time_budget_s, color="k", ls="--", lw=1, label="time budget")
    tasks = sorted({r["task"] for r in rows if r.get("task")})
    quality_title = f"quality: {', '.join(tasks)} (trained at the dotted length)"
    target = next((r["target"] for r in rows if r.get("target")), None)
    titles = ["train step time (s)", "compiled scratch memory per device (MiB)", quality_title]
    if target:
        titles[:2] = ["roofline step time (s): model FLOPs at peak",
                      "memory per device (MiB): argument + output + temp - alias"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        if title != quality_title:
            ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    kind = next((r["device_kind"] for r in rows if r.get("device_kind")),
                jax.devices()[0].device_kind)
    fig.suptitle(f"longctx frontier on {target} ({kind}), compiled ahead of time, not run"
                 if target else f"longctx frontier on {kind}")
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
    p.add_argument("--target", default=None,
                   help="compile every point for this hardware (v5p-8, h100x8, ...; needs "
                        "--compile-only); the rows gain memory per device and a roofline")
    p.add_argument("--budget-gb", type=float, default=None,
                   help="scratch memory budget (per device with --mesh)")
    p.add_argument("--compile-only", action="store_true",
                   help="record compiled memory only (status 'compiled'): the memory frontier "
                        "without running a step (simulated devices share the host's cores)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N[,AXIS=N]",
                   help="compile every step over this mesh, e.g. sequence=8 (context "
                        "parallelism); memory is then per device")
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
    try:
        mesh_shape = parse_mesh(args.mesh)
    except ValueError as e:
        p.error(str(e))
    n_dev = math.prod(mesh_shape.values())
    if args.compile_only and args.task:
        p.error("--task (the quality axis) needs trained models; drop --compile-only")
    if mesh_shape and args.task:
        p.error("--task (the quality axis) trains and evaluates on one device; drop --mesh")
    target = None
    if args.target:
        targets.compile_only()
        if not args.compile_only:
            p.error(f"--target {args.target} compiles for hardware this machine may not have: "
                    f"add --compile-only")
        try:
            target = targets.parse(args.target)
        except ValueError as e:
            p.error(str(e))
        if args.budget_gb is None:
            args.budget_gb = target.chip.memory_bytes / 2**30 if target.chip else 8.0
    if args.budget_gb is None:
        args.budget_gb = 8.0
    if target is None and n_dev > jax.device_count():
        p.error(f"--mesh {args.mesh} needs {n_dev} devices but JAX has {jax.device_count()} "
                f"({jax.devices()[0].platform}); on CPU set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={n_dev} before JAX starts "
                f"(python -m experiments.context_sweep does it itself)")
    mesh_name = ",".join(f"{a}={n}" for a, n in mesh_shape.items() if n > 1)
    specs = default_specs(target is not None)
    names = list(specs) if args.backends == ["all"] else args.backends
    unknown = [n for n in names if n not in specs]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; available: {sorted(specs)}")
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    rows = [json.loads(l) for l in open(results_path)] if os.path.exists(results_path) else []
    where = target.name if target else ""
    done = {(r["backend"], r.get("target") or "", r.get("mesh") or "", r["length"]) for r in rows}
    budget = args.budget_gb * 2**30
    lengths = sorted(args.lengths)
    todo = [(n, L) for n in names for L in lengths if (n, where, mesh_name, L) not in done]
    print((f"target: {target.name} (compile-only)" if target else
           f"device: {jax.devices()[0].device_kind}")
          + (f", mesh {mesh_name} ({n_dev} devices)" if mesh_name else "")
          + f"; {len(todo)} points to measure, {len(done)} already in {results_path}")

    def same(r, name):  # earlier rows of this backend on this target and mesh
        return (r["backend"] == name and (r.get("mesh") or "") == mesh_name
                and (r.get("target") or "") == where)


    quality = Quality(args, specs) if args.task else None
    with tqdm(todo, desc="sweep", dynamic_ncols=True) as bar:
        for name, L in bar:
            bar.set_postfix(backend=name, length=L)
            prev = sorted((r for r in rows if same(r, name)
                           and r["status"] in ("ok", "compiled")),
                          key=lambda r: r["length"])
            tag = f"{name}-{L}" + (f"-{mesh_name.replace('=', '').replace(',', '-')}"
                                   if mesh_name else "")
            overrides = [*specs[name], *args.overrides, f"data.seq_len={L}",
                         f"model.max_seq_len={max(L, 1024)}",
                         f"train.run_dir={os.path.join(args.out, 'runs', tag)}"]
            if target is not None:
                overrides.append(f"train.batch_size={args.batch}")
            if mesh_shape:
                overrides.append("mesh.ici={" + ", ".join(f"{a}: {n}" for a, n in
                                                          mesh_shape.items()) + "}")
            row = {"backend": name, "target": target and target.name, "mesh": mesh_name or None,
                   "devices": n_dev, "length": L,
                   "device_kind": jax.devices()[0].device_kind,
                   "jax_version": jax.__version__, "overrides": overrides}
            failed_before = [r for r in rows if same(r, name) and r["length"] < L
                             and r["status"] in ("oom", "oom-predicted", "time-predicted", "slow")]
            lens = [r["length"] for r in prev]
            mem_pred = fit_predict(lens, [r.get("device_bytes") or r.get("scratch_bytes")
                                          for r in prev], L)
            time_pred = fit_predict(lens, [r.get("step_s") or r.get("roofline_step_s")
                                           for r in prev], L)
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
                    if target is not None:
                        row.update(compile_for(cfg, target, budget_bytes=budget,
                                               time_budget_s=args.time_budget_s))
                    else:
                        row.update(measure(cfg, batch=args.batch, repeats=args.repeats,
                                           budget_bytes=budget, long_step_s=args.long_step_s,
                                           mesh_shape=mesh_shape or None,
                                           compile_only=args.compile_only))
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
    plot(rows, os.path.join(args.out, "frontier.png"), budget, args.time_budget_s)
    print(open(os.path.join(args.out, "results.md")).read())
    return rows


if __name__ == "__main__":
    main()
