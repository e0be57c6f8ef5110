"""A train step compiled ahead of time, saved and loaded (MaxText's compiled_trainstep_file).

``python -m longctx.compile --target v5p-128 --config CFG --save DIR`` compiles the
trainer's step for a slice from any machine and writes ``DIR/``:

* ``executable.bin`` -- ``jax.experimental.serialize_executable.serialize`` of the step;
* ``meta.json`` -- what it was compiled for: the platform, device kind and count, the
  mesh axes, and the fingerprint of the config (:func:`fingerprint`).

On the slice, ``train.compiled_step=DIR`` makes the trainer load it instead of
compiling (:func:`load`), after checking that this run is the one it was compiled for:
same devices, same mesh, same program-relevant config. The argument and result
structures are the trainer's own (re-derived here, never unpickled from the file).

The executable is a pickle-based format (JAX's own): load only files you made.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import yaml

from longctx.atomic import staged_dir
from longctx.config import ConfigError, to_dict

EXECUTABLE, META = "executable.bin", "meta.json"

# Keys that do not change the compiled step (where the run writes, how often it logs,
# which files feed it): a step compiled under one value runs under another.
RUN_ONLY = {
    "train": ("run_dir", "log_every", "eval_every", "eval_batches", "tensorboard",
              "compiled_step"),
    "data": ("path", "eval_path", "seed", "eval_seed", "shuffle"),
    "checkpoint": ("every_steps", "keep", "async_save", "resume"),
}


def fingerprint(cfg) -> str:
    """sha256 of the resolved config without the :data:`RUN_ONLY` keys."""
    d = to_dict(cfg)
    for section, keys in RUN_ONLY.items():
        for k in keys:
            d.get(section, {}).pop(k, None)
    return hashlib.sha256(yaml.safe_dump(d, sort_keys=True).encode()).hexdigest()


def mesh_signature(mesh) -> dict:
    """What a compiled step is bound to: platform, device kind and count, mesh axes."""
    dev = mesh.devices.flat[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind, "devices": int(mesh.size),
            "mesh": {a: int(n) for a, n in mesh.shape.items()}}


def save(compiled: jax.stages.Compiled, path: str, cfg, mesh, *, target: str) -> None:
    """Write ``path/`` (complete or not at all; an existing ``path`` must be empty)."""
    from jax.experimental import serialize_executable

    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"--save {path!r} exists and is not an empty directory")
    payload, _, _ = serialize_executable.serialize(compiled)
    meta = {"target": target, **mesh_signature(mesh), "config_sha256": fingerprint(cfg),
            "jax_version": jax.__version__}
    with staged_dir(path) as tmp:
        with open(os.path.join(tmp, EXECUTABLE), "wb") as f:
            f.write(payload)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)


def load(path: str, cfg, mesh, jitted, args) -> jax.stages.Compiled:
    """The step saved at ``path``, for this run's ``mesh`` and ``cfg``; ``jitted`` is the
    trainer's own jitted step and ``args`` its (abstract) arguments, which give the
    argument and result structures. Raises ``ConfigError`` when the file was compiled
    for other devices, another mesh or another config, naming both sides."""
    from jax.experimental import serialize_executable

    meta_path, exe_path = os.path.join(path, META), os.path.join(path, EXECUTABLE)
    if not (os.path.isfile(meta_path) and os.path.isfile(exe_path)):
        raise ConfigError(f"train.compiled_step={path!r}: expected a directory with {META} and "
                          f"{EXECUTABLE} (python -m longctx.compile --save {path})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.compiled_step={path!r}: unreadable {META}: {e}") from e
    here = {**mesh_signature(mesh), "config_sha256": fingerprint(cfg),
            "jax_version": jax.__version__}
    diff = {k: (meta.get(k), v) for k, v in here.items() if meta.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: compiled for {a!r}, this run has {b!r}" for k, (a, b) in
                         diff.items())
        raise ConfigError(f"train.compiled_step={path!r} was compiled for another "
                          f"{'topology' if set(diff) - {'config_sha256'} else 'config'} "
                          f"({what}); compile it again for this run")
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    in_tree = jax.tree.structure((tuple(shapes), {}))
    out_tree = jax.tree.structure(jax.eval_shape(jitted, *shapes))
    with open(exe_path, "rb") as f:
        payload = f.read()
    return serialize_executable.deserialize_and_load(
        payload, in_tree, out_tree, execution_devices=list(mesh.devices.flat))


def memory_analysis_of(step, *args):
    """``memory_analysis()`` of a jitted step (compiled for ``args``) or a loaded one."""
    if isinstance(step, jax.stages.Compiled):
        return step.memory_analysis()
    return step.lower(*args).compile().memory_analysis()
