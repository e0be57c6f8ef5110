"""python -m longctx.evals --run-dir DIR --task passkey|mqar --lengths L [L ...]"""

import argparse
import logging

from longctx.evals.core import run


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m longctx.evals",
                                description="Evaluate a trainer checkpoint at several lengths.")
    p.add_argument("--run-dir", required=True, help="the trainer's run directory")
    p.add_argument("--task", required=True, choices=["passkey", "mqar"])
    p.add_argument("--lengths", type=int, nargs="+", required=True)
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--examples", type=int, default=32, help="per length (and depth)")
    p.add_argument("--out", default=None, help="JSONL (default: RUN_DIR/eval_TASK.jsonl)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.rope_scaling=4")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True)
    rows = run(args.run_dir, task=args.task, lengths=args.lengths, depths=args.depths,
               examples=args.examples, overrides=args.overrides, out=args.out)
    keys = [k for k in ("length", "depth", "accuracy", "exact_match") if k in rows[0]]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
                                for k in keys) + " |")


if __name__ == "__main__":
    main()
