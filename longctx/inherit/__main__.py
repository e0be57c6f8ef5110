"""python -m longctx.inherit --parent RUN --config CHILD.yaml --ratio R --method M --run-dir OUT

Writes a run directory that ``python -m longctx.train --config OUT/config.yaml`` continues:

* ``config.yaml``: the child's resolved config (``CHILD.yaml``, then the ``key=value``
  overrides, then ``train.run_dir=OUT`` and, for distillation, the ``distill`` section);
* ``checkpoints/0``: step 0 in the trainer's own format (model + fresh optimizer state +
  the input iterator's start), so the trainer resumes from it instead of initialising;
* ``inheritance.json``: the parent, ratio, method and what was mapped (rule -> count).

``--method interpolate | layers`` inherits weights (:func:`longctx.inherit.core.inherit`;
the fresh part is ``build_model(child, rngs=nnx.Rngs(train.seed))``, the trainer's own
init). ``--method distill``: fresh weights, and the trainer distils from the parent with
``distill.alpha = R`` (decayed over ``distill.steps``, an override).
``--distill-alpha A`` adds distillation to a weight method.

``--parent`` is a longctx run directory (``config.yaml`` + ``checkpoints/``) or a Hugging
Face model directory (``config.json`` + safetensors, read by :func:`longctx.hf.load`).
Distillation needs a run directory parent (the trainer restores it on its mesh): convert
a Hugging Face parent first (``python -m longctx.hf --from-hf DIR --run-dir RUN``). The
output is written to a temporary directory beside ``OUT`` and renamed when complete; an
existing non-empty ``OUT`` is refused.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys

from flax import nnx

from longctx import hf
from longctx.atomic import staged_dir
from longctx.config import ConfigError, config_yaml, load_config, with_overrides
from longctx.evals.core import load_model
from longctx.inherit.core import METHODS, correspondence, inherit
from longctx.model import build_model
from longctx.train.checkpoint import Checkpointer
from longctx.train.loop import make_input
from longctx.train.optimizer import make_optimizer

CLI_METHODS = METHODS + ("distill",)


def load_parent(path: str):
    """``(config, model)`` of a parent: a longctx run directory (its newest checkpoint) or
    a Hugging Face model directory."""
    if os.path.exists(os.path.join(path, "config.yaml")):
        cfg, model, _ = load_model(path)
        return cfg, model
    if os.path.exists(os.path.join(path, "config.json")):
        model, cfg = hf.load(path)
        return cfg, model
    raise ConfigError(f"--parent {path!r}: neither a longctx run directory (config.yaml) nor "
                      "a Hugging Face directory (config.json)")


def write_run(parent, child_cfg, run_dir: str, *, ratio: float, method: str,
              distill_alpha: float = 0.0, parent_dir: str | None = None) -> dict:
    """Build the child and write its run directory (see the module docstring)."""
    if parent.cfg.vocab_size != child_cfg.model.vocab_size:
        raise ConfigError(f"the parent's vocab_size={parent.cfg.vocab_size} differs from the "
                          f"child's model.vocab_size={child_cfg.model.vocab_size}")
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise FileExistsError(f"--run-dir {run_dir!r} exists and is not empty")
    over = [f"train.run_dir={run_dir}"]
    if method == "distill":
        distill_alpha = ratio
    if distill_alpha > 0:
        if not (parent_dir and os.path.exists(os.path.join(parent_dir, "config.yaml"))):
            raise ConfigError(f"distillation needs a longctx run directory as --parent; got "
                              f"{parent_dir!r} (convert a Hugging Face model first: python -m "
                              "longctx.hf --from-hf DIR --run-dir RUN)")
        over += [f"distill.parent={os.path.abspath(parent_dir)}",
                 f"distill.alpha={distill_alpha}"]
    cfg = with_overrides(child_cfg, over)
    if not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.resume=false: the trainer would start from a fresh init "
                          "and ignore the inherited step 0; leave it true")
    rngs = nnx.Rngs(cfg.train.seed)  # the trainer's own init
    if method == "distill":
        child, rules = build_model(cfg.model, rngs=rngs), {}
    else:
        child = inherit(parent, cfg.model, ratio=ratio, method=method, rngs=rngs)
        rules = collections.Counter(m.rule for m in correspondence(
            parent, cfg.model, ratio=ratio, method=method))
    optimizer = nnx.Optimizer(child, make_optimizer(cfg.optim, cfg.train.steps), wrt=nnx.Param)
    info = {"parent": parent_dir, "ratio": ratio, "method": method,
            "distill_alpha": distill_alpha, "mapped": dict(rules)}
    out = os.path.abspath(run_dir)
    with staged_dir(out) as tmp:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml(cfg))
        with open(os.path.join(tmp, "inheritance.json"), "w") as f:
            json.dump(info, f, indent=1)
        ckpt = Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False)
        data = {"input": iter(make_input(cfg)).get_state(), "step": 0}
        ckpt.save(0, nnx.to_pure_dict(nnx.state((child, optimizer))), data, wait=True)
        ckpt.close()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m longctx.inherit",
                                description="Write a child run directory that inherits a "
                                            "fraction of a parent.")
    p.add_argument("--parent", required=True, help="longctx run directory of the parent")
    p.add_argument("--config", required=True, help="the child's YAML config")
    p.add_argument("--ratio", type=float, required=True, help="fraction in [0, 1]")
    p.add_argument("--method", default="interpolate", choices=CLI_METHODS)
    p.add_argument("--distill-alpha", type=float, default=0.0,
                   help="also distil from the parent (interpolate / layers)")
    p.add_argument("--run-dir", required=True, help="output run directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the child's config")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("absl", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if not 0.0 <= args.ratio <= 1.0:
            raise ConfigError(f"--ratio {args.ratio} must be in [0, 1]")
        child_cfg = load_config(args.config, args.overrides)
        _, parent = load_parent(args.parent)
        info = write_run(parent, child_cfg, args.run_dir, ratio=args.ratio, method=args.method,
                         distill_alpha=args.distill_alpha, parent_dir=args.parent)
    except (ConfigError, ValueError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"inherit: {e}")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
