"""Scaling curves: train / evaluate over a knob, fit the curve, tell log-linear from a phase change.

    python -m experiments.scaling --knob length --values 256 1024 4096 16384 --seeds 3 \\
        --task niah_single --backends flash gated_deltanet hybrid recurrent --train-len 256
    python -m experiments.scaling --knob train.steps --values 50 100 200 400 --seeds 2 --task mqar

``--knob length``: the evaluated context length. Each backend x seed is trained once
at ``--train-len`` and evaluated at every value (train short, test long).
``--knob KEY`` (any config key, e.g. ``train.steps``, ``model.d_model``): one training
run per value x seed x backend, evaluated at ``--eval-len`` (default: the training
length).

Every point is scored under two metrics side by side (Schaeffer et al. 2023): exact
match (all answer tokens right; discontinuous) and the answer's mean per-token
log-probability (continuous), plus token accuracy. ``longctx.evals.scaling.fit``
then fits each backend x metric over the knob (seeds as repeated x).

Outputs in ``--out``: ``scaling.jsonl`` (``kind: point`` rows, one per backend x value
x seed; ``kind: fit`` rows, one per backend x metric), ``scaling.md`` (the fits) and
``scaling.png`` (points with their seed spread, fitted curves with 95 % bootstrap
bands, phase-change intervals shaded). ``scaling.md`` also tabulates the points (each
metric's mean over seeds and its range, per backend and value).

``--refit FILE [FILE ...]`` trains nothing: it reads the ``kind: point`` rows of earlier
``scaling.jsonl`` files (e.g. backends run as separate processes), fits them together
and writes the same outputs to ``--out``. Backends are the context sweep's named specs
(``experiments.context_sweep.default_specs``). Runs go to ``--out/runs/``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from experiments.context_sweep import default_specs, train_run
from longctx.config import load_config
from longctx.data import synthetic
from longctx.evals import scaling
from longctx.evals.core import load_model
from longctx.evals.ruler import task_eval

METRICS = ("exact_match", "answer_logprob", "accuracy")


def points(args, specs):
    """Train / evaluate every backend x value x seed: the ``kind: point`` rows."""
    rows = []
    base = [f"data.task={args.task}", *args.overrides]
    for name in args.backends:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            runs = {}  # value -> run dir
            if args.knob == "length":
                ov = [*specs[name], *base, f"data.seq_len={args.train_len}",
                      f"model.max_seq_len={max(args.train_len, 1024)}"]
                d = train_run(args.config, ov, os.path.join(args.out, "runs", f"{name}-s{seed}"),
                              steps=args.train_steps, seed=seed)
                runs = {v: d for v in args.values}
            else:
                for v in args.values:
                    ov = [*specs[name], *base, f"data.seq_len={args.train_len}",
                          f"{args.knob}={v}"]
                    if args.knob == "train.steps":
                        steps = int(v)
                    else:
                        steps = args.train_steps
                    runs[v] = train_run(args.config, ov, os.path.join(
                        args.out, "runs", f"{name}-{args.knob}={v}-s{seed}"), steps=steps,
                        seed=seed)
            loaded = {}
            for v in args.values:
                L = int(v) if args.knob == "length" else (args.eval_len or args.train_len)
                if runs[v] not in loaded:
                    top = max(args.values) if args.knob == "length" else L
                    loaded[runs[v]] = load_model(runs[v], max_len=int(top))
                cfg, model, _ = loaded[runs[v]]
                m = task_eval(model, cfg, args.task, length=L, examples=args.examples,
                              **({"depth": tuple(args.depth)} if args.depth else {}))
                row = {"kind": "point", "backend": name, "knob": args.knob, "value": float(v),
                       "seed": seed, "length": L, "task": args.task, **m}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def fits(rows, *, n_boot):
    """One ``kind: fit`` row per backend x metric, and the `Fit` objects by (backend, metric)."""
    out, objs = [], {}
    for name in dict.fromkeys(r["backend"] for r in rows):
        pts = [r for r in rows if r["backend"] == name]
        x = np.array([r["value"] for r in pts])
        for metric in METRICS:
            y = np.array([r[metric] for r in pts])
            row = {"kind": "fit", "backend": name, "metric": metric}
            if np.unique(x).size < 3:
                row.update(best=None, message="needs at least 3 distinct knob values")
            else:
                objs[name, metric] = scaling.fit(x, y, n_boot=n_boot)
                row.update(objs[name, metric].to_dict())
            out.append(row)
    return out, objs


def points_table(rows):
    """Markdown: per backend x value, each metric's mean over seeds [min, max]."""
    lines = ["| backend | value | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for name in dict.fromkeys(r["backend"] for r in rows):
        for v in sorted({r["value"] for r in rows if r["backend"] == name}):
            pts = [r for r in rows if r["backend"] == name and r["value"] == v]
            cells = [f"{np.mean([r[m] for r in pts]):.3f} [{min(r[m] for r in pts):.3f}, "
                     f"{max(r[m] for r in pts):.3f}]" for m in METRICS]
            lines.append(f"| {name} | {_fmt(v)} | {len(pts)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(fit_rows, path, rows=()):
    lines = ["| backend | metric | best curve | parameters (95 % CI) | phase change x0 (CI) |",
             "|---|---|---|---|---|"]
    for r in fit_rows:
        if r["best"] is None:
            lines.append(f"| {r['backend']} | {r['metric']} | - | {r['message']} | - |")
            continue
        ps = ", ".join(f"{k}={v:.3g} [{r['ci'][k][0]:.3g}, {r['ci'][k][1]:.3g}]"
                       for k, v in r["params"].items())
        pc = r["phase_change"]
        pcs = "none" if pc is None else f"{pc[1]:.4g} [{pc[0]:.4g}, {pc[2]:.4g}]"
        lines.append(f"| {r['backend']} | {r['metric']} | {r['best']} | {ps} | {pcs} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
        if rows:
            f.write("\n" + points_table(rows))


def plot(rows, objs, path, knob):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2))
    for ax, metric in zip(axes, METRICS):
        for i, name in enumerate(dict.fromkeys(r["backend"] for r in rows)):
            color = f"C{i}"
            pts = [r for r in rows if r["backend"] == name]
            xs = sorted({r["value"] for r in pts})
            ys = [[r[metric] for r in pts if r["value"] == v] for v in xs]
            mean = np.array([np.mean(y) for y in ys])
            err = np.array([[m - min(y) for m, y in zip(mean, ys)],
                            [max(y) - m for m, y in zip(mean, ys)]])
            ax.errorbar(xs, mean, yerr=err, fmt="o", color=color, capsize=3, label=name)
            f = objs.get((name, metric))
            if f is not None:
                grid = np.logspace(np.log10(xs[0]), np.log10(xs[-1]), 200)
                ax.plot(grid, f.predict(grid), "-", color=color, lw=1, label=f"{name}: {f.best}")
                lo, hi = f.band(grid)
                ax.fill_between(grid, lo, hi, color=color, alpha=0.15)
                if f.phase_change is not None:
                    ax.axvspan(f.phase_change[0], f.phase_change[2], color=color, alpha=0.2)
        ax.set_xscale("log", base=2 if knob == "length" else 10)
        ax.set_xlabel(knob)
        ax.set_title(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--knob", help="'length' (evaluated length) or a config key")
    p.add_argument("--values", nargs="+", type=float)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + seeds - 1 (split a run over processes)")
    p.add_argument("--task", help=f"a synthetic task: {sorted(synthetic.TASKS)}")
    p.add_argument("--backends", nargs="+", default=["flash"])
    p.add_argument("--config", default="experiments/configs/sweep.yaml")
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--eval-len", type=int, default=None, help="knob != length: eval length")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--examples", type=int, default=32, help="per point")
    p.add_argument("--depth", type=float, nargs=2, default=None,
                   help="needle depth range (lo hi) of the evaluated examples")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--refit", nargs="+", default=None, metavar="JSONL",
                   help="fit the point rows of these scaling.jsonl files; no training")
    p.add_argument("--no-plot", action="store_true", help="skip scaling.png")
    p.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = p.parse_args(argv)
    if args.refit:
        rows = [r for path in args.refit for r in map(json.loads, open(path))
                if r.get("kind") == "point"]
        if not rows:
            p.error(f"--refit: no 'kind: point' rows in {args.refit}")
        return write_outputs(rows, args.out, n_boot=args.n_boot, knob=rows[0]["knob"],
                             plot_png=not args.no_plot)
    missing = [a for a in ("knob", "values", "task") if getattr(args, a) is None]
    if missing:
        p.error("the following arguments are required: " + ", ".join(f"--{a}" for a in missing))
    if args.task not in synthetic.TASKS:
        p.error(f"unknown --task {args.task!r}; expected one of {sorted(synthetic.TASKS)}")
    if any(v <= 0 for v in args.values):
        p.error(f"--values must be > 0 (got {args.values})")
    specs = default_specs()
    unknown = [n for n in args.backends if n not in specs]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; available: {sorted(specs)}")
    if args.knob == "length":
        args.values = [int(v) for v in args.values]
    else:  # fail now on a bad key, not after the first runs
        load_config(args.config, [f"data.task={args.task}", *args.overrides,
                                  f"data.seq_len={args.train_len}",
                                  f"{args.knob}={_fmt(args.values[0])}"])
        args.values = [_fmt(v) for v in args.values]
    os.makedirs(args.out, exist_ok=True)
    return write_outputs(points(args, specs), args.out, n_boot=args.n_boot, knob=args.knob,
                         plot_png=not args.no_plot)


def write_outputs(rows, out, *, n_boot, knob, plot_png=True):
    """Fit ``rows``; write ``scaling.jsonl``, ``scaling.md`` (and ``scaling.png``) in ``out``."""
    os.makedirs(out, exist_ok=True)
    fit_rows, objs = fits(rows, n_boot=n_boot)
    tmp = os.path.join(out, "scaling.jsonl.tmp")
    with open(tmp, "w") as f:
        for r in rows + fit_rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, os.path.join(out, "scaling.jsonl"))
    write_table(fit_rows, os.path.join(out, "scaling.md"), rows)
    if plot_png:
        plot(rows, objs, os.path.join(out, "scaling.png"), knob)
    print(open(os.path.join(out, "scaling.md")).read())
    return rows, fit_rows


def _fmt(v: float):
    return int(v) if float(v).is_integer() else v


if __name__ == "__main__":
    main()
