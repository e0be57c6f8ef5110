"""What inheritance buys: children that start from 100 / 50 / 20 / 0 % of a parent.

    nice -n 10 python -m experiments.inheritance                  # the default run (CPU)
    python -m experiments.inheritance --quick                     # a smoke run (seconds)
    python -m experiments.inheritance --archs same linear --methods interpolate layers distill
    python -m experiments.inheritance --archs hybrid --out runs/inh/B   # one share of a split
    python -m experiments.inheritance --from-results runs/inh/*/results.jsonl --out runs/inh

A parent (``--config`` with the overrides of ``BASE``: a small ``full`` model with the
short q/k/v conv) is trained on MQAR for ``--parent-steps``. Then, for every target
architecture (``ARCHS``: the same, ``linear`` = gated DeltaNet, ``hybrid`` = [linear,
full], ``recurrent`` = segment attention with an XL cache and a compressive memory,
``moe`` = dense -> 4 experts upcycled, ``hedgehog`` = gated DeltaNet with the learned
Hedgehog feature map; the default leaves ``hedgehog`` out), method (``interpolate`` by
default; ``layers``, ``distill``; see ``longctx.inherit``; ``distill`` is skipped for
targets that scan segments) and
ratio in ``--ratios``, a child is built with :func:`longctx.inherit` (``distill``: fresh
weights, KL to the parent with ``alpha_0 = ratio`` decayed to 0 over the child's steps) and
trained for the same ``--steps`` with the same optimizer and data, for ``--seeds`` seeds
(seed = the fresh part's init and the data order). Ratio 0 is the fresh model, the same
for every method, so it is trained once per (architecture, seed); so is ``layers`` at a ratio
that inherits no layer (``round(ratio * n_layers) = 0``: the fresh model), which is skipped.

Metric: held-out MQAR accuracy at the query positions (``data.eval_seed``) every
``--eval-every`` steps; *recovered* = child accuracy / parent accuracy; *steps to 90%*:
the first evaluated step with recovered >= 0.9 (``>steps`` if never within the budget);
*steps to fresh@end*: the first evaluated step at which a child reaches the fresh
model's final accuracy (mean over seeds): the steps it needs for what fresh training
gets in the whole budget.
Outputs in ``--out``: ``results.jsonl`` (one row per child with its curve),
``results.md`` (mean +- std over seeds; std is the population std of the seeds), ``recovered.png`` (recovered vs steps, a line
per ratio, a panel per architecture x method).

Every architecture's train step is compiled once (the trainer's ``make_train_step``) and
reused for all ratios, methods and seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from flax import nnx

import longctx
from longctx.config import task_kwargs
from longctx.data import synthetic
from longctx.inherit.distill_config import DistillConfig
from longctx.inherit.core import inherited_layers
from longctx.train.distill import Distiller
from longctx.train.optimizer import make_optimizer
from longctx.train.step import make_eval_step, make_train_step

BASE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.mlp_dim=128", "model.vocab_size=128", "data.seq_len=64",
        "data.num_kv_pairs=4", "train.batch_size=32", "optim.lr=3e-3",
        "optim.warmup_steps=30", "optim.weight_decay=0.0"]
ARCHS = {
    "same": [],
    "linear": ["model.attention.backend=linear"],  # gated DeltaNet (the linear default)
    "hybrid": ["model.attention.pattern=[linear, full]"],
    # segment attention with memory: 32-token segments, the previous segment's k/v cached
    # (Transformer-XL) and an Infini-attention linear compressive memory
    "recurrent": ["model.attention.backend=recurrent", "model.segment_len=32",
                  "model.attention.recurrent.compressive=linear"],
    # dense -> MoE upcycling: every expert the parent's MLP, top-2 of 4 renormalised
    "moe": ["model.moe.num_experts=4", "model.moe.num_experts_per_tok=2",
            "model.moe.norm_topk_prob=true"],
    # gated DeltaNet with Hedgehog's learned feature map (identity at the start)
    "hedgehog": ["model.attention.backend=linear", "model.attention.linear.feature_map=hedgehog"],
}
DEFAULT_ARCHS = ["same", "linear", "hybrid", "recurrent", "moe"]
METHODS = ("interpolate", "layers", "distill")


def batches(cfg, *, seed: int, n: int, start: int = 0):
    d = cfg.data
    return [synthetic.make_batch(d.task, seed=seed, start_index=start + i * cfg.train.batch_size,
                                 batch_size=cfg.train.batch_size, seq_len=d.seq_len,
                                 vocab_size=cfg.model.vocab_size, **task_kwargs(cfg))
            for i in range(n)]


def strip(b):
    return {k: b[k] for k in ("tokens", "targets", "loss_mask")}


class Runner:
    """Compiled train / eval steps per (config, distill) and a training loop."""

    def __init__(self, eval_batches):
        self.eval_batches = [strip(b) for b in eval_batches]
        self.cache = {}

    def steps(self, cfg, steps: int, distiller):
        key = (cfg.model, steps, None if distiller is None else distiller.dcfg)  # alpha static
        if key not in self.cache:
            graphdef = nnx.split(nnx.eval_shape(lambda: self._build(cfg, steps)))[0]
            self.cache[key] = (jax.jit(make_train_step(graphdef, 1, distill=distiller)),
                               jax.jit(make_eval_step(graphdef)))
        return self.cache[key]

    @staticmethod
    def _build(cfg, steps, model=None):
        """(model, a fresh AdamW of the config's schedule over ``steps``)."""
        if model is None:
            model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, make_optimizer(cfg.optim, steps), wrt=nnx.Param)

    def evaluate(self, eval_step, state):
        rows = [eval_step(state, b) for b in self.eval_batches]
        return (float(np.mean([r["loss"] for r in rows])),
                float(np.mean([r["accuracy"] for r in rows])))

    def train(self, cfg, model, data, *, steps: int, eval_every: int, distiller=None,
              parent_state=None):
        """Train ``model`` on ``data`` (batches, cycled) -> (trained model, curve) with
        ``curve`` = [(step, eval loss, eval accuracy)] from step 0."""
        train_step, eval_step = self.steps(cfg, steps, distiller)
        graphdef, state = nnx.split(self._build(cfg, steps, model))
        extra = () if distiller is None else (parent_state,)
        curve = [(0, *self.evaluate(eval_step, state))]
        for s in range(steps):
            state, _ = train_step(state, strip(data[s % len(data)]), *extra)
            if (s + 1) % eval_every == 0 or s + 1 == steps:
                curve.append((s + 1, *self.evaluate(eval_step, state)))
        return nnx.merge(graphdef, state)[0], curve


def scanned(cfg) -> bool:
    """Whether the model scans segments (distillation needs one-pass models:
    ``longctx.train.distill``); ``distill`` is skipped for such targets."""
    return bool(cfg.model.segment_len) and cfg.data.seq_len > cfg.model.segment_len


def steps_to(curve, target):
    return next((s for s, _, acc in curve if acc >= target), None)


def summarise(rows, parent_acc, ratios, out):
    """Markdown table: mean +- std over seeds per (arch, method, ratio)."""
    lines = [f"parent held-out MQAR accuracy: {parent_acc:.3f}", "",
             "| arch | method | ratio | recovered @0 | recovered @end | steps to 90% "
             "(per seed) | steps to fresh@end (per seed) | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    groups, fresh_end = {}, {}
    for r in rows:
        groups.setdefault((r["arch"], r["method"], r["ratio"]), []).append(r)
        if r["method"] == "fresh":
            fresh_end.setdefault(r["arch"], []).append(r["curve"][-1][2])
    # fresh@end: the fresh model's final accuracy (mean over seeds); the first evaluated
    # step a child reaches it, i.e. the steps it needs for what fresh training gets
    fresh_end = {a: float(np.mean(v)) for a, v in fresh_end.items()}

    def steps(r, target):
        s = steps_to(r["curve"], target)
        return f">{r['curve'][-1][0]}" if s is None else str(s)

    for (arch, method, ratio), rs in groups.items():
        r0 = np.array([r["curve"][0][2] / parent_acc for r in rs])
        r1 = np.array([r["curve"][-1][2] / parent_acc for r in rs])
        s90 = ", ".join(steps(r, 0.9 * parent_acc) for r in rs)
        sfr = ", ".join(steps(r, fresh_end[arch]) for r in rs) if arch in fresh_end else "-"
        lines.append(f"| {arch} | {method} | {ratio:g} | {r0.mean():.2f} ± {r0.std():.2f} | "
                     f"{r1.mean():.2f} ± {r1.std():.2f} | {s90} | {sfr} | {len(rs)} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


def plot(rows, parent_acc, out):
    import matplotlib  # noqa: PLC0415 - optional output; the experiment runs without a display

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = sorted({(r["arch"], r["method"]) for r in rows if r["method"] != "fresh"})
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)  # one colour per ratio
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.2),
                             squeeze=False)
    for ax, (arch, method) in zip(axes[0], panels):
        for r in [r for r in rows if r["arch"] == arch and r["method"] in (method, "fresh")]:
            c = np.array(r["curve"])
            ax.plot(c[:, 0], c[:, 2] / parent_acc, color=f"C{ratios.index(r['ratio'])}",
                    alpha=0.8, label=f"ratio {r['ratio']:g}" if r["seed"] == 0 else None)
        ax.axhline(0.9, color="grey", lw=0.5)
        ax.set(title=f"{arch} / {method}", xlabel="steps", ylabel="recovered (acc / parent)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recovered.png"), dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.inheritance")
    p.add_argument("--config", default="experiments/configs/tiny.yaml")
    p.add_argument("--archs", nargs="+", default=DEFAULT_ARCHS, choices=list(ARCHS))
    p.add_argument("--methods", nargs="+", default=["interpolate"], choices=METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=[1.0, 0.5, 0.2, 0.0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--parent-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=100, help="each child's training steps")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run")
    p.add_argument("--out", default="runs/inheritance")
    p.add_argument("--from-results", nargs="+", metavar="JSONL",
                   help="train nothing: the table and plot of these results.jsonl files "
                        "(runs split over processes, e.g. by --archs, with the same parent)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    a = p.parse_args(argv)
    if a.quick:
        a.parent_steps, a.steps, a.eval_every, a.seeds = 20, 10, 5, 1
    os.makedirs(a.out, exist_ok=True)
    if a.from_results:
        rows = [json.loads(line) for path in a.from_results for line in open(path)]
        accs = {r["parent_acc"] for r in rows}
        if len(accs) != 1:
            raise SystemExit(f"--from-results: the files have different parents "
                             f"(parent accuracies {sorted(accs)}); expected one parent")
        print(summarise(rows, accs.pop(), a.ratios, a.out))
        plot(rows, rows[0]["parent_acc"], a.out)
        return
    base = longctx.load_config(a.config, BASE + a.overrides)
    t0 = time.time()
    runner = Runner(batches(base, seed=base.data.eval_seed, n=a.eval_batches))

    # -- the parent ---------------------------------------------------------------------
    parent = longctx.build_model(base.model, rngs=nnx.Rngs(1000))
    parent, pcurve = runner.train(base, parent, batches(base, seed=1000, n=a.parent_steps),
                                  steps=a.parent_steps, eval_every=a.parent_steps)
    parent_acc = pcurve[-1][2]
    print(f"parent: {a.parent_steps} steps, held-out accuracy {parent_acc:.3f} "
          f"({time.time() - t0:.0f}s)", flush=True)
    pdef, pmodel_state = nnx.split((parent,))

    # -- the children ---------------------------------------------------------------------
    rows = []
    with open(os.path.join(a.out, "results.jsonl"), "w") as f:
        for arch in a.archs:
            cfg = longctx.load_config(a.config, BASE + a.overrides + ARCHS[arch])
            if "distill" in a.methods and scanned(cfg):
                print(f"{arch}: scans segments, distill skipped", flush=True)
            for seed in range(a.seeds):
                data = batches(cfg, seed=seed, n=a.steps)
                runs = [("fresh", 0.0)] if 0.0 in a.ratios else []
                runs += [(m, r) for m in a.methods for r in a.ratios if r > 0
                         and (m != "layers" or inherited_layers(r, cfg.model.n_layers))
                         and (m != "distill" or not scanned(cfg))]
                for method, ratio in runs:
                    rngs = nnx.Rngs(seed)
                    distiller = None
                    if method in ("distill", "fresh"):
                        child = longctx.build_model(cfg.model, rngs=rngs)
                        if method == "distill":
                            distiller = Distiller(pdef, DistillConfig(
                                parent="(in memory)", alpha=ratio, steps=a.steps))
                    else:
                        child = longctx.inherit(parent, cfg.model, ratio=ratio, method=method,
                                                rngs=rngs)
                    _, curve = runner.train(cfg, child, data, steps=a.steps,
                                            eval_every=a.eval_every, distiller=distiller,
                                            parent_state=pmodel_state)
                    row = {"arch": arch, "method": method, "ratio": ratio, "seed": seed,
                           "parent_acc": parent_acc, "curve": curve,
                           "steps_to_90": steps_to(curve, 0.9 * parent_acc)}
                    rows.append(row)
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"{arch:7s} {method:11s} ratio {ratio:4.2f} seed {seed}: acc "
                          f"{curve[0][2]:.3f} -> {curve[-1][2]:.3f}, steps to 90% "
                          f"{row['steps_to_90']} ({time.time() - t0:.0f}s)", flush=True)
    print(summarise(rows, parent_acc, a.ratios, a.out))
    plot(rows, parent_acc, a.out)
    print(f"wrote {a.out}/results.jsonl, results.md, recovered.png ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
