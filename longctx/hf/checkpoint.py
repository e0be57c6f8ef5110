"""Load and save Hugging Face checkpoints (config.json + safetensors), no torch.

    model, cfg = load("path/to/hf_dir", mesh=mesh)     # cfg: longctx.Config
    save(model, cfg, "out_dir")                         # transformers loads it

Loading validates everything before reading a byte of weights (config fields,
every expected tensor present in its file with its shape and a float dtype, no
unknown tensor left over), then reads one tensor at a time with the
``safetensors`` numpy API (memory-mapped; bfloat16, which numpy lacks, through
``numpy.memmap`` of the tensor's byte range viewed as ``ml_dtypes.bfloat16``),
converts it to the longctx layout and places it: with a ``mesh``, straight into
its shards with ``jax.make_array_from_callback`` (each device gets only its
slice); without, on the default device. Host memory holds at most one
parameter at a time besides the placed arrays (benchmark:
``experiments/bench_hf_load.py``). A file is opened per tensor so that its
mapping is dropped right after the read (mapped pages would count in RSS).

Saving writes into a temporary directory beside ``path`` and renames it into
place; above ``max_shard_size`` bytes the tensors are split into
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
Multi-process: ``save`` gathers fully addressable arrays only (run it on one
process or gather first).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from longctx.config import Config, ModelConfig
from longctx.hf.config import architecture, choose_architecture, from_hf_config, to_hf_config
from longctx.hf.mapping import IGNORED_SUFFIXES, hf_shapes, table
from longctx.model import build_model
from longctx.model.layout import from_per_layer, to_per_layer
from longctx.parallel import sharding as shd

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                "F64": np.float64}
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class CheckpointError(ValueError):
    """A Hugging Face checkpoint that cannot be read as the model its config describes."""


# ----------------------------------------------------------------------------
# Reading safetensors files
# ----------------------------------------------------------------------------


def _files(path: str) -> dict[str, str]:
    """Tensor name -> file path, from the index file or the single file."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        missing = sorted({v for v in weight_map.values()
                          if not os.path.exists(os.path.join(path, v))})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: neither {INDEX} nor {SINGLE} found")
    with safe_open(single, "np") as f:
        return {k: single for k in f.keys()}


def _headers(files: dict[str, str]) -> dict[str, tuple[tuple, str]]:
    """Tensor name -> (shape, safetensors dtype) for every tensor the files hold."""
    out = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(file, "np") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # noqa: BLE001 -- a corrupt file names itself
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    for k, file in files.items():
        if k not in out:
            raise CheckpointError(f"tensor {k!r}: the index maps it to {file}, which lacks it")
    return out


def _read(file: str, name: str, st_dtype: str) -> np.ndarray:
    """One tensor as numpy (its own memory; the file mapping is closed on return)."""
    if st_dtype != "BF16":
        with safe_open(file, "np") as f:
            return f.get_tensor(name)
    with open(file, "rb") as fh:  # numpy has no bfloat16: map the bytes, view, copy
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))[name]
    start, end = meta["data_offsets"]
    raw = np.memmap(file, np.uint16, "r", offset=8 + n + start, shape=((end - start) // 2,))
    out = np.array(raw).view(ml_dtypes.bfloat16).reshape(meta["shape"])
    del raw
    return out


# ----------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def load(path: str, *, dtype: str = "float32", mesh=None, rules=None, progress: bool = False):
    """``(model, cfg)`` from a Hugging Face model directory.

    ``dtype``: dtype of the loaded parameters (``float32``, the project's, or
    ``bfloat16`` to halve memory; the compute dtype is ``cfg.model.dtype``).
    ``mesh``: place every parameter in its shards on this mesh (logical axes
    mapped by ``rules``, default ``longctx.parallel.axes.DEFAULT_RULES``).
    """
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"{dtype=}; expected one of {sorted(PARAM_DTYPES)}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{cfg_path} not found")
    with open(cfg_path) as f:
        hf = json.load(f)
    m = from_hf_config(hf)
    arch = architecture(hf)
    files = _files(path)
    headers = _headers(files)

    build = lambda: build_model(m, rngs=nnx.Rngs(0))  # noqa: E731
    abstract = nnx.eval_shape(build)
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    per_layer = to_per_layer(m, nnx.to_pure_dict(abs_params))
    entries = table(m, arch)

    # -- validate every name, shape and dtype before reading any weight --------------
    used = set()
    for e in entries:
        shape = tuple(_get(per_layer, e.path).shape)
        for name, want in zip(e.hf, hf_shapes(e, shape)):
            if name not in headers:
                raise CheckpointError(f"tensor {name!r} missing from the checkpoint {path} "
                                      f"(needed for {'/'.join(map(str, e.path))})")
            got, st = headers[name]
            if tuple(got) != tuple(want):
                raise CheckpointError(f"tensor {name!r} in {files[name]} has shape {list(got)}; "
                                      f"expected {list(want)} from config.json")
            if st not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor {name!r} in {files[name]} has dtype {st}; "
                                      f"expected one of {sorted(FLOAT_DTYPES)}")
            used.add(name)
    tied_head = {"lm_head.weight"} if m.tie_embeddings else set()
    extra = sorted(k for k in headers if k not in used and k not in tied_head
                   and not k.endswith(IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"{path}: tensors with no place in the {arch} model: {extra[:8]}"
                              + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))

    # -- read, convert and place one parameter at a time -----------------------------
    rules = {**shd.DEFAULT_RULES, **(rules or {})}
    shardings = stacked = None
    if mesh is not None:
        stacked = nnx.to_pure_dict(shd.state_shardings(abs_params, mesh, rules))
        shardings = to_per_layer(m, stacked)
    pdt = np.dtype(PARAM_DTYPES[dtype])
    values = jax.tree.map(lambda x: None, per_layer)
    for e in tqdm(entries, desc="load", disable=not progress, unit="tensor"):
        shape = tuple(_get(per_layer, e.path).shape)
        arrays = [_read(files[n], n, headers[n][1]) for n in e.hf]
        host = e.from_hf(arrays, shape).astype(pdt, copy=False)
        del arrays
        if shardings is None:
            value = jax.device_put(host)
        else:
            sharding = _get(shardings, e.path)
            value = jax.make_array_from_callback(shape, sharding, lambda idx, h=host: h[idx])
        _set(values, e.path, value)
        del host
    params = nnx.state(abstract, nnx.Param)
    values = from_per_layer(m, values)  # stacked layers (model.scan_layers): jnp.stack
    if stacked is not None:  # ... placed as the rules say, the `layers` axis included
        values = jax.device_put(values, stacked)
    nnx.replace_by_pure_dict(params, values)
    # Variables that are not parameters (router bias of aux-free balancing, jitter rngs):
    # their own initial values, computed without the parameters' initialisers (dead code).
    rest = jax.jit(lambda: nnx.state(build(), nnx.Not(nnx.Param)))() \
        if jax.tree.leaves(abs_rest) else abs_rest
    model = nnx.merge(graphdef, params, rest)
    return model, Config(model=m)


# ----------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards, cur, used = [], [], 0
    for name, n in sizes:
        if cur and used + n > max_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += n
    return shards + ([cur] if cur else [])


def save(model, cfg, path: str, *, architecture: str | None = None,
         max_shard_size: int = 5 * 10**9, overwrite: bool = False,
         progress: bool = False) -> str:
    """Write ``model`` as a Hugging Face directory (config.json + float32 safetensors).

    ``cfg``: a ``Config`` or ``ModelConfig``. ``architecture``: the HF class
    (default: chosen from the features, see ``longctx.hf.config.choose_architecture``);
    a feature the architecture cannot express is an error naming the key.
    """
    m: ModelConfig = cfg.model if isinstance(cfg, Config) else cfg
    arch = architecture or choose_architecture(m)
    hf = to_hf_config(m, arch)
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True")
    per_layer = to_per_layer(m, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    entries = table(m, arch)
    sizes = []
    for e in entries:
        n = int(np.prod(_get(per_layer, e.path).shape)) * 4 // len(e.hf)
        sizes += [(name, n) for name in e.hf]
    shards = _plan_shards(sizes, max_shard_size)
    owner = {name: i for i, names in enumerate(shards) for name in names}
    file_names = ([SINGLE] if len(shards) == 1 else
                  [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                   for i in range(len(shards))])
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        pending: dict[int, dict] = {}
        bar = tqdm(total=len(entries), desc="save", disable=not progress, unit="tensor")
        for e in entries:  # the table's order fills the shards in order: one shard in memory
            x = np.asarray(jax.device_get(_get(per_layer, e.path)), np.float32)
            for name, arr in zip(e.hf, e.to_hf(x)):
                pending.setdefault(owner[name], {})[name] = arr
            del x
            for i in sorted(pending):
                if all(n in pending[i] for n in shards[i]):
                    save_file(pending.pop(i), os.path.join(tmp, file_names[i]),
                              metadata={"format": "pt"})
            bar.update()
        bar.close()
        if len(shards) > 1:
            total = sum(n for _, n in sizes)
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total},
                           "weight_map": {name: file_names[owner[name]] for name, _ in sizes}},
                          f, indent=2)
        if os.path.exists(path):
            old = path.rstrip("/") + ".old-" + os.path.basename(tmp)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
