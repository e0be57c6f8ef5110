"""Perplexity by position on real text that ships with Python: does far context lower the loss?

    python -m experiments.perplexity_by_position --backends flash gated_deltanet hybrid recurrent \\
        --train-len 256 --lengths 256 1024 4096 --train-steps 300

Builds a byte-level corpus (token = UTF-8 byte, vocabulary 256) from the standard
library's own source files (``sysconfig.get_paths()["stdlib"]``, ``*.py``, sorted),
every ``--holdout``-th file held out, as two ``.bin`` token files; trains each
backend ``--train-steps`` steps at ``--train-len`` on the training files
(``data.source=tokens``), and evaluates ``longctx.evals.perplexity`` on the held-out
files at every length (at and beyond the trained length). Writes ``ppl.jsonl``,
``ppl.md`` and ``ppl.png`` (loss per log-spaced position bucket, one line per
backend and length) in ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig

import numpy as np

from experiments.context_sweep import default_specs, train_run
from longctx.evals.core import load_model
from longctx.evals.perplexity import perplexity_eval


def build_corpus(out_dir, *, max_bytes=4_000_000, holdout=10):
    """``out_dir/{train,heldout}.bin`` (uint16 bytes) from the stdlib's ``*.py``; their paths."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise FileNotFoundError("no *.py files in the standard library directory")
    parts = {"train": [], "heldout": []}
    total = 0
    for i, f in enumerate(files):
        data = np.frombuffer(open(f, "rb").read(), np.uint8)
        parts["heldout" if i % holdout == 0 else "train"].append(data)
        total += data.size
        if total >= max_bytes:
            break
    paths = {}
    for split, arrs in parts.items():
        paths[split] = os.path.join(out_dir, f"{split}.bin")
        tmp = paths[split] + ".tmp"
        np.concatenate(arrs).astype(np.uint16).tofile(tmp)
        os.replace(tmp, paths[split])
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["flash", "gated_deltanet"])
    p.add_argument("--config", default="experiments/configs/sweep.yaml")
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--examples", type=int, default=8, help="held-out windows per length")
    p.add_argument("--out", default="runs/perplexity")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    specs = default_specs()
    os.makedirs(args.out, exist_ok=True)
    paths = build_corpus(args.out)
    print({k: os.path.getsize(v) // 2 for k, v in paths.items()}, "tokens")
    rows = []
    for name in args.backends:
        run = train_run(args.config, [*specs[name], "data.source=tokens",
                                      f"data.path={paths['train']}",
                                      f"data.eval_path={paths['heldout']}",
                                      "data.token_dtype=uint16", "model.vocab_size=256",
                                      f"data.seq_len={args.train_len}",
                                      f"model.max_seq_len={max(args.train_len, 1024)}",
                                      *args.overrides],
                        os.path.join(args.out, "runs", name), steps=args.train_steps)
        cfg, model, _ = load_model(run, max_len=max(args.lengths))
        for r in perplexity_eval(model, cfg, lengths=args.lengths, examples=args.examples):
            rows.append({"backend": name, **r})
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "ppl.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    L = max(args.lengths)
    buckets = [(r["pos_lo"], r["pos_hi"]) for r in rows if r["backend"] == args.backends[0]
               and r["length"] == L]
    lines = ["| backend | " + " | ".join(f"{lo}-{hi}" for lo, hi in buckets) + " |",
             "|---|" + "---|" * len(buckets)]
    for name in args.backends:
        lines.append(f"| {name} | " + " | ".join(
            f"{r['loss']:.3f}" for r in rows if r["backend"] == name and r["length"] == L) + " |")
    table = f"loss (nats/byte) by position, evaluated at {L}, trained at {args.train_len}\n\n" + \
        "\n".join(lines) + "\n"
    open(os.path.join(args.out, "ppl.md"), "w").write(table)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, name in enumerate(args.backends):
        for j, length in enumerate(args.lengths):
            rs = [r for r in rows if r["backend"] == name and r["length"] == length]
            ax.plot([max((r["pos_lo"] + r["pos_hi"]) / 2, 0.5) for r in rs],
                    [r["loss"] for r in rs], "o-", color=f"C{i}", alpha=0.4 + 0.6 * (j + 1) /
                    len(args.lengths), label=f"{name} @ {length}")
    ax.axvline(args.train_len, color="k", ls=":", lw=0.8, label="trained length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "ppl.png"), dpi=110)
    return rows


if __name__ == "__main__":
    main()
