"""Per-chip memory and roofline step time of real model shapes on real targets, compiled here.

    python -m experiments.compile_targets --out runs/compile_targets \\
        [--models model_1b model_8b moe_30b_a3b] [--targets v5e-16 v5p-8 v6e-8] \\
        [--backends full gated_deltanet hybrid] [--seq-len 8192]
    # GPUs need the CUDA plugin (pip install -e '.[gpu]'), libtpu is not needed for them:
    python -m experiments.compile_targets --out runs/compile_targets --targets h100x8
    python -m experiments.compile_targets --out runs/compile_targets --table   # table only

Each cell is ``python -m longctx.compile`` of ``experiments/configs/<model>.yaml`` with
the backend's overrides, one sequence per device (``--batch`` = devices; fsdp over all of
them, the configs' mesh), at ``--seq-len``. Rows are appended to ``results.jsonl``
(resumable: a cell already there is not compiled again) and ``results.md`` is the table:
GiB per device (argument + output + temp - alias), fits, roofline step time (the model's
FLOPs at the chips' peak: a roofline, not a measurement), compile seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

BACKENDS = {
    "full": [],
    "gated_deltanet": ["model.attention.backend=linear",
                       "model.attention.linear.variant=gated_deltanet"],
    "hybrid": ["model.attention.pattern=[linear, linear, linear, full]",
               "model.attention.linear.variant=gated_deltanet"],
}


def cell(model, target, backend, seq_len, extra=()):
    from longctx import targets
    from longctx.compile import build_config, compile_step

    t = targets.parse(target)
    n = t.devices_expected
    if t.chip is not None and t.chip.name == "v4":
        n //= 2  # one sequence per chip (2 TensorCore devices)
    cfg = build_config(f"experiments/configs/{model}.yaml", [*BACKENDS[backend], *extra],
                       batch=n, seq_len=seq_len)
    return compile_step(cfg, t)


def write_table(rows, path):
    cols = ["model", "backend", "target", "seq_len", "GiB/device", "fits", "roofline_step_s",
            "compile_s", "kernels"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["model"], r["backend"], r["target"])):
        gib = r.get("device_bytes")
        kernels = sorted({k.split(":")[-1] for k in r.get("custom_calls") or {}
                          if ":" in k or "cudnn" in k or "ragged" in k})
        lines.append("| " + " | ".join([
            r["model"], r["backend"], r["target"], str(r["seq_len"]),
            "-" if gib is None else f"{gib / 2**30:.2f}" + ("" if r.get("compiled", True)
                                                            else " (refused)"),
            str(r.get("fits")), "-" if r.get("roofline_step_s") is None
            else f"{r['roofline_step_s']:.3f}",
            "-" if r.get("compile_s") is None else f"{r['compile_s']:.0f}",
            ", ".join(kernels) or "-"]) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/compile_targets")
    p.add_argument("--models", nargs="+", default=["model_1b", "model_8b", "moe_30b_a3b"])
    p.add_argument("--targets", nargs="+", default=["v5e-16", "v5p-8", "v6e-8"])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--table", action="store_true", help="only rewrite results.md")
    p.add_argument("overrides", nargs="*", help="config overrides for every cell")
    args = p.parse_args(argv)
    from longctx import targets

    targets.compile_only()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    done = {(r["model"], r["backend"], r["target"], r["seq_len"]) for r in rows}
    if not args.table:
        for model in args.models:
            for target in args.targets:
                for backend in args.backends:
                    key = (model, backend, target, args.seq_len)
                    if key in done:
                        continue
                    t0 = time.perf_counter()
                    row = {"model": model, "backend": backend, "target": target,
                           "seq_len": args.seq_len, "overrides": args.overrides}
                    try:
                        r = cell(model, target, backend, args.seq_len, args.overrides)
                        row.update(r, compiled="refused" not in r)
                    except Exception as e:  # noqa: BLE001 -- recorded, the grid goes on
                        traceback.print_exc()
                        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    row["wall_s"] = time.perf_counter() - t0
                    print(json.dumps({k: row.get(k) for k in (
                        "model", "backend", "target", "device_bytes", "fits", "roofline_step_s",
                        "compile_s", "error")}), flush=True)
                    rows.append(row)
                    with open(path, "a") as f:
                        f.write(json.dumps(row) + "\n")
    write_table(rows, os.path.join(args.out, "results.md"))
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    sys.exit(main())
