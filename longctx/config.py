"""Typed config: one dataclass schema, YAML overlays, dotted ``key=value`` overrides.

    cfg = load_config("experiments/configs/tiny.yaml",
                      overrides=["model.attention.backend=full", "train.steps=100"])

Resolution order: the dataclass defaults below, then the YAML chain (a file may
name its parent with a top-level ``base: other.yaml``, resolved relative to the
file, so ``tiny.yaml`` overlays ``base.yaml``), then the overrides. Values in
overrides are parsed as YAML scalars (``1e-3``, ``true``, ``null``). YAML is
safe-loaded only.

Everything is checked at load time: an unknown key names the nearest valid
ones, a wrong type names the key, the value and the expected type, and
impossible combinations (``n_heads % n_kv_heads``, an unregistered backend in
``model.attention.pattern``, a sequence longer than the KV cache, ...) say which
values clash.

Each backend's section lives with the backend (``longctx/backends/<name>/config.py``,
the MoE's in ``longctx/moe/config.py``) and validates itself: its own keys always,
and what it needs of the rest of the model when some layer uses it
(``validate_use``). This module imports those sections and no jax; the mixers
are built from explicit sizes plus their section alone
(``longctx.backends.base.MixerDims``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from longctx.backends.full.config import FullConfig
from longctx.backends.linear.config import LinearConfig
from longctx.backends.recurrent.config import RecurrentConfig
from longctx.data import ruler, synthetic
from longctx.errors import ConfigError, require
from longctx.inherit.distill_config import DistillConfig
from longctx.moe.config import MoEConfig
from longctx.parallel.axes import DEFAULT_RULES, LOGICAL_AXES, MESH_AXES
from longctx.rope_config import ROPE_LAYOUTS, RopeScalingConfig

__all__ = ["AttentionConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "DistillConfig", "FullConfig", "LinearConfig", "MeshConfig", "ModelConfig", "MoEConfig",
           "OptimConfig", "RecurrentConfig", "RopeScalingConfig", "TrainConfig", "load_config",
           "with_overrides"]


# ----------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------


# Backend name -> the config section its layers read (``model.attention.<name>``; the
# exact-attention keys of ``full`` sit directly under ``model.attention``). The mixers of
# the same names are registered in longctx/model/registry.py (a test keeps the two equal).
SECTIONS = {
    "full": lambda a: FullConfig(**{f.name: getattr(a, f.name)
                                    for f in dataclasses.fields(FullConfig)}),
    "linear": lambda a: a.linear,
    "recurrent": lambda a: a.recurrent,
}
BACKENDS = tuple(SECTIONS)


@dataclass(frozen=True)
class AttentionConfig(FullConfig):
    """The token mixers: FullConfig's keys (``impl``, ``block_q``, ``block_k``, ``window``,
    ``conv_size``, ...: exact attention of the `full` layers and of the `recurrent` layers'
    local attention), the backend of every layer or a hybrid pattern, each backend's section."""

    backend: str = "full"  # every layer's token mixer when `pattern` is empty (see BACKENDS)
    # Hybrid models: backend names repeated over the layers, e.g. [linear, linear, linear,
    # full] (3:1 as Qwen3-Next / Kimi Linear); n_layers must be a multiple of its length.
    # Empty: every layer is `backend`.
    pattern: tuple[str, ...] = ()
    linear: LinearConfig = field(default_factory=LinearConfig)  # `linear` layers
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)  # `recurrent` layers

    def layer_backends(self, n_layers: int) -> list[str]:
        """The backend of each of ``n_layers`` layers (``pattern`` repeated, or ``backend``)."""
        if not self.pattern:
            return [self.backend] * n_layers
        return [self.pattern[i % len(self.pattern)] for i in range(n_layers)]

    def section(self, name: str):
        """The config section the ``name`` layers read (see ``SECTIONS``)."""
        return SECTIONS[name](self)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # token ids 0 .. vocab_size - 1 (embedding and LM head rows)
    d_model: int = 128  # model (residual stream) width
    n_layers: int = 2  # blocks: token mixer + feed-forward each
    n_heads: int = 4  # query heads of every mixer
    n_kv_heads: int = 4  # < n_heads: GQA; 1: MQA
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_dim: int = 512  # SwiGLU hidden width
    max_seq_len: int = 4096  # KV-cache length of `full` when decoding or scanning segments
    segment_len: int = 0  # 0: one pass over the sequence; N: scan over N-token segments
    bptt_segments: int = 0  # truncate gradients through carried state every N segments; 0: never
    tie_embeddings: bool = True  # LM head = embedding^T
    rope_theta: float = 10_000.0  # RoPE base (Su et al. 2021)
    # RoPE scaling as HF defines it (longctx/rope_config.py), e.g. {type: linear, factor: 4}
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    rope_layout: str = "half"  # half (rotate-half: GPT-NeoX, HF) | interleaved (GPT-J, Meta)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal init of the weight matrices
    dtype: str = "float32"  # compute dtype (params stay float32): float32 | bfloat16
    remat: str = "none"  # per-block rematerialisation: none | full | minimal | dots | offload_dots
    # Layers (pattern groups) stacked [n, ...] and run by lax.scan: compile time flat in
    # depth (longctx/model/layout.py); false: an unrolled list, one compiled copy per layer
    # (debugging, per-layer inspection: `model.blocks[i]`).
    scan_layers: bool = True
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def layer_backends(self) -> list[str]:
        return self.attention.layer_backends(self.n_layers)


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # synthetic | text (UTF-8 files, bytes) | jsonl | tokens (.bin)
    path: str | None = None  # file (or comma-separated files) for text / jsonl / tokens; tokens: or a directory made by longctx.data.prepare
    token_dtype: str = "uint16"  # tokens: uint16 | uint32
    eos_id: int | None = None  # tokens: document separator id in the .bin stream
    text_field: str = "text"  # jsonl: the field holding the text
    task: str = "mqar"  # synthetic: mqar | passkey | copy | selective_copy | RULER (data/ruler.py)
    seq_len: int = 64  # tokens per training row (the trained context length)
    seed: int = 0  # example i of the stream is a function of (seed, i) only
    shuffle: bool = True  # file sources: shuffle rows (deterministic from seed)
    num_kv_pairs: int = 4  # mqar: key-value pairs per example
    passkey_len: int = 5  # passkey: digits of the passkey
    passkey_depth_min: float = 0.0  # passkey, RULER: needle depth drawn uniformly in [min, max]
    passkey_depth_max: float = 1.0  #   (0: start of the haystack, 1: just before the query)
    eval_seed: int = 1  # held-out synthetic stream for evaluation
    eval_path: str | None = None  # held-out file for file sources; None: no evaluation


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps of the run
    batch_size: int = 32  # global batch (all processes together)
    grad_accum_steps: int = 1  # microbatches per step; batch_size must divide by it
    loss_chunk_size: int = 0  # >0: head + cross entropy this many tokens at a time (no [B,T,V])
    seed: int = 0  # parameter init
    log_every: int = 50  # metrics row (metrics.jsonl, TensorBoard, progress bar) every N steps
    eval_every: int = 250  # held-out evaluation every N steps; 0: only at the end
    eval_batches: int = 4  # held-out batches per evaluation
    run_dir: str = "runs/default"  # output: config.yaml, checkpoints/, metrics.jsonl, tb/
    tensorboard: bool = True  # also write TensorBoard events to run_dir/tb
    # a train step compiled ahead of time (python -m longctx.compile --save PATH): loaded
    # instead of compiling; refused when compiled for other devices, mesh or config
    compiled_step: str | None = None


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    schedule: str = "cosine"  # after warmup: cosine | linear | constant
    warmup_steps: int = 100  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear)
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.1  # AdamW; not applied to norms, biases or embeddings' scale
    grad_clip: float = 1.0  # global-norm clipping; 0: off


def _default_rules() -> dict:
    return {k: list(v) for k, v in DEFAULT_RULES.items()}


@dataclass(frozen=True)
class MeshConfig:
    # Sizes of the mesh axes data, fsdp, tensor, expert, sequence; -1 = the rest.
    ici: dict[str, int] = field(default_factory=lambda: {"data": -1})
    # Multi-slice (DCN) sizes per axis; the mesh axis size is ici * dcn.
    dcn: dict[str, int] = field(default_factory=dict)
    # Logical axis name -> mesh axes it is split over (longctx.parallel.sharding).
    rules: dict[str, list[str]] = field(default_factory=_default_rules)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500  # save every N steps (and at the end); 0: only at the end
    keep: int = 3  # keep the last N checkpoints
    async_save: bool = True  # write in the background while training continues
    resume: bool = True  # restore the latest good checkpoint of run_dir at start


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # distil from a parent run


COMPUTE_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "minimal", "dots", "offload_dots")  # model/transformer.py
SCHEDULES = ("cosine", "linear", "constant")
DATA_SOURCES = ("synthetic", "text", "jsonl", "tokens")


# ----------------------------------------------------------------------------
# dict <-> dataclass with type checking
# ----------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {' | '.join(_type_name(a) for a in args)}")
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return {_coerce(k, key_tp, f"{key} key"): _coerce(v, val_tp, f"{key}.{k}")
                for k, v in value.items()}
    if origin is tuple:  # tuple[X, ...]: a YAML list, kept immutable (configs are hashable)
        return tuple(_coerce(value, list[typing.get_args(tp)[0]], key))
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # `embed: fsdp` is shorthand for [fsdp]
            value = [value]
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping (a section with the keys "
                              f"{', '.join(f.name for f in dataclasses.fields(tp))})")
        return _from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")


def _unknown_key(prefix: str, name: str, valid) -> ConfigError:
    near = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(prefix + n for n in near)}?" if near else ""
    return ConfigError(f"unknown config key {prefix + name!r}{hint} "
                       f"(valid keys under {prefix.rstrip('.') or 'the top level'}: "
                       f"{', '.join(sorted(valid))})")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise _unknown_key(prefix, str(k), names)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml_chain(path: str, seen=()) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path!r}")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"config files include each other in a cycle: {path!r}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parent = data.pop("base", None)
    if parent is None:
        return data
    parent_path = os.path.join(os.path.dirname(path), parent)
    return _merge(_read_yaml_chain(parent_path, seen + (os.path.abspath(path),)), data)


def apply_override(data: dict, override: str) -> dict:
    """``"model.d_model=256"`` -> data with that leaf set (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    parts = key.strip().split(".")
    nested: Any = value
    for p in reversed(parts):
        nested = {p: nested}
    return _merge(data, nested)


def load_config(path: str | None = None, overrides=()) -> Config:
    """Defaults <- YAML chain at ``path`` <- ``overrides``; validated."""
    data = _read_yaml_chain(path) if path else {}
    for o in overrides:
        data = apply_override(data, o)
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, overrides) -> Config:
    """A validated copy of ``cfg`` with dotted ``key=value`` overrides applied."""
    data = to_dict(cfg)
    for o in overrides:
        data = apply_override(data, o)
    new = _from_dict(Config, data)
    validate(new)
    return new


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        f.write(config_yaml(cfg))


# ----------------------------------------------------------------------------
# Validation of combinations
# ----------------------------------------------------------------------------


_require = require


def validate_model(m: ModelConfig, *, seq_len: int | None = None) -> None:
    """Sizes, the layer pattern and every section; ``seq_len`` (the data's) where known."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim",
                 "max_seq_len"):
        _require(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)} must be >= 1")
    _require(m.n_heads % m.n_kv_heads == 0,
             f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads}")
    if m.head_dim is None:
        _require(m.d_model % m.n_heads == 0,
                 f"model.d_model={m.d_model} not divisible by model.n_heads={m.n_heads}; "
                 "set model.head_dim explicitly")
    _require(m.resolved_head_dim % 2 == 0,
             f"head_dim={m.resolved_head_dim} must be even (RoPE rotates pairs)")
    _require(m.segment_len >= 0, f"model.segment_len={m.segment_len} must be >= 0")
    _require(m.bptt_segments >= 0, f"model.bptt_segments={m.bptt_segments} must be >= 0")
    m.rope_scaling.validate()
    _require(m.rope_layout in ROPE_LAYOUTS,
             f"model.rope_layout={m.rope_layout!r}; expected one of {ROPE_LAYOUTS}")
    _require(m.dtype in COMPUTE_DTYPES, f"model.dtype={m.dtype!r}; expected one of {COMPUTE_DTYPES}")
    _require(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}; expected one of {REMAT_POLICIES}")
    _require(isinstance(m.scan_layers, bool),
             f"model.scan_layers={m.scan_layers!r}; expected true or false")
    a = m.attention
    _require(a.backend in BACKENDS,
             f"model.attention.backend={a.backend!r} is not registered; "
             f"registered backends: {sorted(BACKENDS)}")
    unknown = [n for n in a.pattern if n not in BACKENDS]
    _require(not unknown, f"model.attention.pattern={list(a.pattern)}: {unknown} not "
                          f"registered; registered backends: {sorted(BACKENDS)}")
    _require(not a.pattern or m.n_layers % len(a.pattern) == 0,
             f"model.n_layers={m.n_layers} must be a multiple of the length "
             f"{len(a.pattern)} of model.attention.pattern={list(a.pattern)}")
    # Every section checks its own keys (typos fail even if no layer uses it); the sections
    # of the backends in use also check what they need of the rest of the model.
    FullConfig.validate(a)
    a.linear.validate()
    a.recurrent.validate()
    backends = m.layer_backends
    for name in dict.fromkeys(backends):
        a.section(name).validate_use(m, seq_len=seq_len,
                                     layers=[i for i, b in enumerate(backends) if b == name])
    m.moe.validate(m.n_layers)


def validate(cfg: Config) -> None:
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    validate_model(m, seq_len=d.seq_len)
    _require(d.source in DATA_SOURCES,
             f"data.source={d.source!r}; expected one of {DATA_SOURCES}")
    if d.source != "synthetic":
        _require(d.path is not None, f"data.source={d.source!r} needs data.path")
    _require(d.token_dtype in ("uint16", "uint32"),
             f"data.token_dtype={d.token_dtype!r}; expected 'uint16' or 'uint32'")
    _require(d.task in synthetic.TASKS,
             f"data.task={d.task!r}; expected one of {sorted(synthetic.TASKS)}")
    _require(d.seq_len >= 1, f"data.seq_len={d.seq_len} must be >= 1")
    try:  # the generator knows its own constraints (vocab, length) and names them
        synthetic.make_batch(d.task, seed=d.seed, start_index=0, batch_size=1,
                             seq_len=d.seq_len, vocab_size=m.vocab_size, **task_kwargs(cfg))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    _require(t.steps >= 1 and t.batch_size >= 1,
             f"train.steps={t.steps}, train.batch_size={t.batch_size} must be >= 1")
    _require(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1")
    _require(t.loss_chunk_size >= 0, f"train.loss_chunk_size={t.loss_chunk_size} must be >= 0")
    _require(t.grad_accum_steps >= 1 and t.batch_size % t.grad_accum_steps == 0,
             f"train.batch_size={t.batch_size} must be a multiple of "
             f"train.grad_accum_steps={t.grad_accum_steps}")
    validate_mesh(cfg.mesh)
    c = cfg.checkpoint
    _require(c.every_steps >= 0 and c.keep >= 1,
             f"checkpoint.every_steps={c.every_steps} must be >= 0 and checkpoint.keep={c.keep} >= 1")
    _require(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}; expected one of {SCHEDULES}")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _require(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    cfg.distill.validate()


def validate_mesh(m: MeshConfig) -> None:
    for name, shape in (("ici", m.ici), ("dcn", m.dcn)):
        for ax, size in shape.items():
            _require(ax in MESH_AXES, f"mesh.{name}.{ax}: unknown mesh axis; expected one of "
                                      f"{MESH_AXES}")
            _require(size >= 1 or (size == -1 and name == "ici"),
                     f"mesh.{name}.{ax}={size} must be >= 1" + (" or -1" if name == "ici" else ""))
    _require(sum(v == -1 for v in m.ici.values()) <= 1,
             f"mesh.ici={m.ici}: at most one axis may be -1")
    for logical, axes in m.rules.items():
        _require(logical in LOGICAL_AXES,
                 f"mesh.rules.{logical}: unknown logical axis; expected one of {LOGICAL_AXES}")
        for ax in axes:
            _require(ax in MESH_AXES, f"mesh.rules.{logical}: {ax!r} is not a mesh axis "
                                      f"{MESH_AXES}")


def task_kwargs(cfg: Config) -> dict:
    """The task-specific generator options of ``cfg.data``."""
    d = cfg.data
    depth = (d.passkey_depth_min, d.passkey_depth_max)
    return {"mqar": dict(num_kv_pairs=d.num_kv_pairs),
            "passkey": dict(passkey_len=d.passkey_len, depth=depth),
            # RULER (ids and the text template): the needle depth
            **{t: dict(depth=depth) for t in [*ruler.TASKS, "niah_text"]}}.get(d.task, {})
