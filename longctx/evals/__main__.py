"""python -m longctx.evals --run-dir DIR --task passkey|mqar|ruler|perplexity|passkey_text --lengths L [L ...]"""

import argparse
import logging

import numpy as np

from longctx.data.ruler import RULER_TASKS
from longctx.evals.core import TASKS, run


def _table(rows, keys):
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(
            "" if r.get(k) is None else f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
            for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m longctx.evals",
                                description="Evaluate a trainer checkpoint at several lengths.")
    p.add_argument("--run-dir", required=True, help="the trainer's run directory")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--lengths", type=int, nargs="+", required=True)
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--examples", type=int, default=32, help="per length (and depth)")
    p.add_argument("--ruler-tasks", nargs="+", choices=RULER_TASKS, default=None,
                   help="ruler: a subset of the suite (default: all)")
    p.add_argument("--data", default=None,
                   help="perplexity: held-out .bin file(s) or prepared directory "
                        "(default: the run's data.eval_path); passkey_text: the haystack")
    p.add_argument("--tokenizer", default=None,
                   help="passkey_text: tokenizer.json or Hugging Face directory (default: bytes)")
    p.add_argument("--out", default=None, help="JSONL (default: RUN_DIR/eval_TASK.jsonl)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. 'model.rope_scaling={type: linear, factor: 4}'")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True)
    rows = run(args.run_dir, task=args.task, lengths=args.lengths, depths=args.depths,
               examples=args.examples, overrides=args.overrides, out=args.out,
               ruler_tasks=args.ruler_tasks, data=args.data, tokenizer=args.tokenizer)
    if args.task == "ruler":
        print(_table(rows, ["subtask", "length", "depth", "exact_match", "accuracy",
                            "answer_logprob"]))
        score = [r for r in rows if r["subtask"] == "score"]
        print(f"\nsummary score (exact match, mean over tasks and lengths): "
              f"{np.mean([r['exact_match'] for r in score]):.3f}")
    elif args.task == "perplexity":
        print(_table(rows, ["length", "pos_lo", "pos_hi", "loss", "ppl", "beyond_trained"]))
    else:
        keys = [k for k in ("length", "depth", "accuracy", "exact_match", "answer_logprob")
                if k in rows[0]]
        print(_table(rows, keys))
    return rows


if __name__ == "__main__":
    main()
