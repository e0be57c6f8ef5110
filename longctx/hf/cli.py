"""Hugging Face checkpoints <-> longctx run directories: the checkpoint CLI.

    python -m longctx.hf --from-hf DIR --run-dir RUN [key=value ...]
    python -m longctx.train --config RUN/config.yaml          # continues from the import
    python -m longctx.evals --run-dir RUN --task perplexity ...
    python -m longctx.hf --to-hf RUN --out DIR                # the latest checkpoint

``python -m longctx.convert`` (the name DESIGN.md documents) runs this same :func:`main`.

``--from-hf`` writes ``RUN/config.yaml`` (the imported architecture, then the
overrides: data, train, optim, mesh, or model keys that keep the parameter
shapes, e.g. ``model.rope_scaling.type=yarn`` for context extension) and a
step-0 checkpoint in ``RUN/checkpoints`` holding the imported weights and a
fresh optimizer, written with the trainer's own ``TrainState`` and
``Checkpointer``, on the trainer's mesh (``mesh.*``), so that training resumes
from it. ``--to-hf`` restores the newest checkpoint's model (no optimizer) and
writes it with ``longctx.hf.save``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import jax
from etils import epath
from flax import nnx

from longctx import hf
from longctx.config import Config, ConfigError, config_yaml, load_config, with_overrides
from longctx.parallel import sharding as shd
from longctx.train.checkpoint import Checkpointer
from longctx.train.loop import make_input
from longctx.train.state import TrainState

log = logging.getLogger(__name__)


def _mesh(cfg: Config):
    return shd.make_mesh(cfg.mesh.ici, cfg.mesh.dcn), {**shd.DEFAULT_RULES, **cfg.mesh.rules}


def from_hf(hf_dir: str, run_dir: str, overrides=(), *, progress: bool = True) -> Config:
    """Import ``hf_dir`` into ``run_dir`` (config.yaml + step-0 checkpoint); the config."""
    config_json = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_json):
        raise hf.CheckpointError(f"{config_json} not found")
    with open(config_json) as f:
        model_cfg = hf.from_hf_config(json.load(f))
    cfg = with_overrides(Config(model=model_cfg), [f"train.run_dir={run_dir}", *overrides])
    mesh, rules = _mesh(cfg)
    model, _ = hf.load(hf_dir, mesh=mesh, rules=rules, progress=progress)
    ts = TrainState.create(cfg, mesh, rules)
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    target = nnx.to_pure_dict(nnx.state(ts.model(), nnx.Param))
    bad = [f"{'/'.join(map(str, p))}: {a.shape} vs {b.shape}" for (p, a), (_, b) in
           zip(_items(loaded), _items(target)) if a.shape != b.shape]
    if bad or len(list(_items(loaded))) != len(list(_items(target))):
        raise ConfigError(f"the overrides {list(overrides)} change the parameters of the "
                          f"imported model: {bad[:4]}")
    nnx.replace_by_pure_dict(ts.state[0], loaded)
    run = epath.Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(str(run / "checkpoints"), keep=cfg.checkpoint.keep, async_save=False)
    if ckpt.steps():
        raise FileExistsError(f"{run_dir}/checkpoints already holds steps {ckpt.steps()}")
    train_it = iter(make_input(cfg))
    ckpt.save(0, nnx.to_pure_dict(ts.state), {"input": train_it.get_state(), "step": 0},
              wait=True)
    ckpt.close()
    (run / "config.yaml").write_text(config_yaml(cfg))
    return cfg


def _items(tree, prefix=()):
    for k in sorted(tree, key=str):
        v = tree[k]
        if isinstance(v, dict):
            yield from _items(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def to_hf(run_dir: str, out: str, *, architecture: str | None = None,
          progress: bool = True) -> str:
    """Export the newest checkpoint of ``run_dir`` as a Hugging Face directory ``out``."""
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    mesh, rules = _mesh(cfg)
    ts = TrainState.create(cfg, mesh, rules, with_optimizer=False)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.checkpoint.keep,
                        async_save=False)
    restored = ts.restore(ckpt)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no readable checkpoint")
    step, _ = restored
    log.info("exporting step %d of %s", step, run_dir)
    with jax.set_mesh(mesh):
        return hf.save(ts.model(), cfg, out, architecture=architecture, progress=progress)


def main(argv=None, prog: str = "python -m longctx.hf"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="DIR", help="Hugging Face model directory to import")
    g.add_argument("--to-hf", metavar="RUN", help="run directory to export")
    p.add_argument("--run-dir", help="--from-hf: the run directory to create")
    p.add_argument("--out", help="--to-hf: the Hugging Face directory to write")
    p.add_argument("--architecture", help="--to-hf: HF class (default: from the features)")
    p.add_argument("overrides", nargs="*", help="--from-hf: dotted overrides, e.g. data.seq_len=4096")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if a.from_hf:
            if not a.run_dir:
                p.error("--from-hf needs --run-dir")
            from_hf(a.from_hf, a.run_dir, a.overrides, progress=not a.no_progress)
            print(f"wrote {a.run_dir}/config.yaml and a step-0 checkpoint; train with: "
                  f"python -m longctx.train --config {a.run_dir}/config.yaml")
        else:
            if not a.out or a.overrides:
                p.error("--to-hf needs --out and takes no overrides")
            print(to_hf(a.to_hf, a.out, architecture=a.architecture, progress=not a.no_progress))
    except (ConfigError, hf.CheckpointError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
