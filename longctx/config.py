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
impossible combinations (``n_heads % n_kv_heads``, an unregistered backend, a
sequence longer than the KV cache, ...) say which values clash. Each layer reads
only its own section (``ModelConfig``, ``AttentionConfig``, ...), so a layer can
be built in a test without a whole config.
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


class ConfigError(ValueError):
    """A config that cannot work; the message names the key and the values."""


# ----------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearConfig:
    # The `linear` backend (longctx/model/mixers/linear.py; kernels in longctx/attention/linear.py).
    variant: str = "gated_deltanet"  # linear | retnet | gla | deltanet | gated_deltanet
    feature_map: str | None = None  # on q, k: identity | elu1 | relu | silu; None: variant default
    chunk_size: int = 64  # tokens per chunk of the chunkwise-parallel form
    conv_size: int = 4  # short causal depthwise conv on q, k, v (its tail is state); 0: off
    key_dim: int | None = None  # per-head key dim K; None: model head_dim
    value_dim: int | None = None  # per-head value dim V; None: model head_dim
    normalize: bool = False  # divide by q . (decayed sum of k); linear | retnet | gla only
    gate_low_rank: int = 16  # gla: rank of the data-dependent gate projection
    gate_normalizer: float = 16.0  # gla: g = logsigmoid(x W1 W2 + b) / gate_normalizer
    # gla: initial gate bias b. "zero": b = 0 (fla), every key forgets at
    # exp(log(1/2)/16) = 0.958 per step at init; "retnet": per head, the bias that makes
    # g = log(1 - 2^(-5-h)) (RetNet's multi-scale decays) at x = 0.
    gate_bias_init: str = "zero"
    output_norm: bool = True  # RMSNorm over each head's output
    output_gate: bool = True  # o * silu(x W_gate) before the output projection


@dataclass(frozen=True)
class RecurrentConfig:
    # The `recurrent` backend (longctx/model/mixers/recurrent.py); carries state only when
    # model.segment_len > 0 (segment_len 0: one segment of model.max_seq_len tokens).
    cache_segments: int = 1  # Transformer-XL: previous segments kept as post-RoPE k/v (no grad)
    compressive: str = "none"  # Infini-attention matrix memory update: none | linear | delta
    knn_size: int = 0  # Memorizing Transformer: past (k, v) per kv head in the kNN store; 0: off
    knn_topk: int = 32  # kNN: pairs retrieved per query and head, 1 <= knn_topk <= knn_size
    knn_approx: bool = False  # kNN: jax.lax.approx_max_k (TPU-fast) instead of exact top_k
    knn_recall: float = 0.95  # kNN: recall_target of approx_max_k
    # Recurrent Memory Transformer: memory tokens read at the start of every segment and
    # written at its end (the model driver adds them; see longctx/model/transformer.py); 0: off
    num_memory_tokens: int = 0


@dataclass(frozen=True)
class AttentionConfig:
    backend: str = "full"  # token mixer from longctx.attention.registry.BACKENDS
    impl: str = "auto"  # exact-attention kernel: auto | xla | flash | cudnn
    block_q: int = 512  # flash: query rows per block
    block_k: int = 512  # flash: keys per block
    window: int | None = None  # sliding-window size in tokens; None = global attention
    # `full`: short causal depthwise conv on q, k, v before RoPE ("smeared keys",
    # Olsson et al. 2022; canon layers, Allen-Zhu 2025); 0: off.
    conv_size: int = 0
    linear: LinearConfig = field(default_factory=LinearConfig)  # backend `linear` only
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)  # backend `recurrent`


@dataclass(frozen=True)
class MoEConfig:
    # Mixture-of-Experts feed-forward (longctx/model/moe.py); MaxText names where they exist.
    num_experts: int = 0  # routed experts E; 0: dense SwiGLU feed-forward in every layer
    num_experts_per_tok: int = 2  # k: experts each token is routed to (token choice)
    expert_dim: int | None = None  # width of each expert (fine-grained: < mlp_dim); None: mlp_dim
    shared_experts: int = 0  # always-on experts: a dense SwiGLU of width shared_experts*expert_dim
    every: int = 1  # after first_dense_layers, every k-th layer is MoE (2: layers n+1, n+3, ...)
    first_dense_layers: int = 0  # the first n layers keep the dense SwiGLU
    router: str = "softmax_topk"  # softmax_topk | topk_softmax (softmax over the k) | sigmoid
    norm_topk_prob: bool = False  # softmax_topk, sigmoid: renormalise the k weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' combine weights
    n_groups: int = 1  # group-limited routing: experts split into n_groups equal groups, and ...
    topk_groups: int = 1  # ... each token picks its experts inside its topk_groups best groups
    jitter_noise: float = 0.0  # training mode only: router input *= U(1 - eps, 1 + eps); 0: off
    dispatch: str | None = None  # dropless | capacity; null: capacity iff capacity_factor > 0
    capacity_factor: float = 0.0  # <= 0: dropless; > 0: ceil(cf * T * k / E) slots/expert/sequence
    dropless_impl: str = "auto"  # auto (CPU: blocks, GPU/TPU: ragged_dot) | blocks | ragged_dot
    load_balance_loss_weight: float = 0.01  # x Switch loss E * sum_i f_i P_i (aux moe_lb_loss)
    router_z_loss_weight: float = 0.0  # x ST-MoE z-loss mean(logsumexp(logits)^2) (aux moe_z_loss)
    routed_bias_update_rate: float = 0.0  # aux-free balancing: bias += rate*sign(mean_load - load)
    expert_parallel: bool = False  # experts over the `expert` mesh axis (if > 1), all-to-all
    expert_choice: bool = False  # experts pick their tokens (Zhou et al. 2022): sees later tokens
    acknowledge_expert_choice_leaks: bool = False  # required by expert_choice: it leaks the future


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads: GQA; 1: MQA
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_dim: int = 512  # SwiGLU hidden width
    max_seq_len: int = 4096  # KV-cache length of `full` when decoding or scanning segments
    segment_len: int = 0  # 0: one pass over the sequence; N: scan over N-token segments
    bptt_segments: int = 0  # truncate gradients through carried state every N segments; 0: never
    tie_embeddings: bool = True  # LM head = embedding^T
    rope_theta: float = 10_000.0
    rope_scaling: float = 1.0  # position interpolation (Chen et al. 2023): positions / factor
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype (params stay float32): float32 | bfloat16
    remat: str = "none"  # per-block rematerialisation: none | full | dots
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # synthetic | text (UTF-8 files, bytes) | jsonl | tokens (.bin)
    path: str | None = None  # file (or comma-separated files) for text / jsonl / tokens
    token_dtype: str = "uint16"  # tokens: uint16 | uint32
    eos_id: int | None = None  # tokens: document separator id in the .bin stream
    text_field: str = "text"  # jsonl: the field holding the text
    task: str = "mqar"  # synthetic task: mqar | passkey | copy | selective_copy
    seq_len: int = 64
    seed: int = 0  # example i of the stream is a function of (seed, i) only
    shuffle: bool = True  # file sources: shuffle rows (deterministic from seed)
    num_kv_pairs: int = 4  # mqar
    passkey_len: int = 5  # passkey
    passkey_depth_min: float = 0.0  # passkey: needle depth drawn uniformly in [min, max]
    passkey_depth_max: float = 1.0  #   (0: start of the haystack, 1: just before the query)
    eval_seed: int = 1  # held-out synthetic stream for evaluation
    eval_path: str | None = None  # held-out file for file sources; None: no evaluation


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch (all processes together)
    grad_accum_steps: int = 1  # microbatches per step; batch_size must divide by it
    seed: int = 0  # parameter init
    log_every: int = 50
    eval_every: int = 250  # 0: only at the end
    eval_batches: int = 4
    run_dir: str = "runs/default"
    tensorboard: bool = True  # also write TensorBoard events to run_dir/tb


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    schedule: str = "cosine"  # after warmup: cosine | linear | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # AdamW; not applied to norms, biases or embeddings' scale
    grad_clip: float = 1.0  # global-norm clipping; 0: off


def _default_rules() -> dict:
    from longctx.parallel.sharding import DEFAULT_RULES

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


COMPUTE_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
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
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
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


def _require(ok: bool, msg: str):
    if not ok:
        raise ConfigError(msg)


def validate_model(m: ModelConfig) -> None:
    from longctx.attention.full import IMPLS
    from longctx.attention.registry import BACKENDS

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
    _require(m.rope_scaling > 0, f"model.rope_scaling={m.rope_scaling} must be > 0")
    _require(m.dtype in COMPUTE_DTYPES, f"model.dtype={m.dtype!r}; expected one of {COMPUTE_DTYPES}")
    _require(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}; expected one of {REMAT_POLICIES}")
    a = m.attention
    _require(a.backend in BACKENDS,
             f"model.attention.backend={a.backend!r} is not registered; "
             f"registered backends: {sorted(BACKENDS)}")
    _require(a.impl in IMPLS, f"model.attention.impl={a.impl!r}; expected one of {IMPLS}")
    _require(a.block_q >= 1 and a.block_k >= 1,
             f"model.attention.block_q={a.block_q}, block_k={a.block_k} must be >= 1")
    _require(a.conv_size >= 0, f"model.attention.conv_size={a.conv_size} must be >= 0")
    _require(a.window is None or a.window >= 1,
             f"model.attention.window={a.window} must be >= 1 or null")
    from longctx.model.mixers.linear import FEATURE_MAPS, VARIANTS, normalize_ok

    lin = a.linear
    _require(lin.variant in VARIANTS, f"model.attention.linear.variant={lin.variant!r}; "
             f"expected one of {tuple(VARIANTS)}")
    _require(lin.feature_map is None or lin.feature_map in FEATURE_MAPS,
             f"model.attention.linear.feature_map={lin.feature_map!r}; expected null or one "
             f"of {tuple(FEATURE_MAPS)}")
    _require(lin.gate_bias_init in ("retnet", "zero"),
             f"model.attention.linear.gate_bias_init={lin.gate_bias_init!r}: expected "
             f"'retnet' or 'zero'")
    _require(lin.chunk_size >= 1 and lin.conv_size >= 0 and lin.gate_low_rank >= 1,
             f"model.attention.linear.chunk_size={lin.chunk_size}, conv_size={lin.conv_size}, "
             f"gate_low_rank={lin.gate_low_rank} must be >= 1, >= 0, >= 1")
    _require((lin.key_dim or 1) >= 1 and (lin.value_dim or 1) >= 1 and lin.gate_normalizer > 0,
             f"model.attention.linear.key_dim={lin.key_dim}, value_dim={lin.value_dim} must "
             f"be >= 1 or null, gate_normalizer={lin.gate_normalizer} > 0")
    _require(not lin.normalize or normalize_ok(lin),
             f"model.attention.linear.normalize=true needs variant linear | retnet | gla and a "
             f"non-negative feature map (elu1 | relu); got variant={lin.variant!r}, "
             f"feature_map={lin.feature_map!r}")
    rec = a.recurrent
    _require(rec.cache_segments >= 0 and rec.knn_size >= 0,
             f"model.attention.recurrent.cache_segments={rec.cache_segments}, "
             f"knn_size={rec.knn_size} must be >= 0")
    _require(rec.compressive in ("none", "linear", "delta"),
             f"model.attention.recurrent.compressive={rec.compressive!r}; expected one of "
             f"('none', 'linear', 'delta')")
    _require(rec.num_memory_tokens >= 0,
             f"model.attention.recurrent.num_memory_tokens={rec.num_memory_tokens} must be >= 0")
    if rec.num_memory_tokens and a.backend == "recurrent":
        _require(m.segment_len > 0,
                 f"model.attention.recurrent.num_memory_tokens={rec.num_memory_tokens} needs "
                 f"model.segment_len > 0 (memory is read and written once per segment)")
    _require(not rec.knn_size or 1 <= rec.knn_topk <= rec.knn_size,
             f"model.attention.recurrent.knn_topk={rec.knn_topk} must be in "
             f"[1, knn_size={rec.knn_size}]")
    _require(0 < rec.knn_recall <= 1,
             f"model.attention.recurrent.knn_recall={rec.knn_recall} must be in (0, 1]")
    _validate_moe(m)


def _validate_moe(m: ModelConfig) -> None:
    e = m.moe
    _require(e.num_experts >= 0, f"model.moe.num_experts={e.num_experts} must be >= 0")
    if e.num_experts == 0:
        return
    from longctx.model.moe import DISPATCHES, DROPLESS_IMPLS, ROUTERS, moe_layers

    E, k = e.num_experts, e.num_experts_per_tok
    _require(1 <= k <= E, f"model.moe.num_experts_per_tok={k} must be in [1, num_experts={E}]")
    _require((e.expert_dim or 1) >= 1 and e.shared_experts >= 0,
             f"model.moe.expert_dim={e.expert_dim} must be >= 1 or null, "
             f"shared_experts={e.shared_experts} >= 0")
    _require(e.every >= 1 and e.first_dense_layers >= 0,
             f"model.moe.every={e.every} must be >= 1, "
             f"first_dense_layers={e.first_dense_layers} >= 0")
    _require(bool(moe_layers(m)),
             f"model.moe.first_dense_layers={e.first_dense_layers}, every={e.every} leave no MoE "
             f"layer among model.n_layers={m.n_layers}; use model.moe.num_experts=0 for dense")
    _require(e.router in ROUTERS, f"model.moe.router={e.router!r}; expected one of {ROUTERS}")
    _require(e.n_groups >= 1 and E % e.n_groups == 0 and 1 <= e.topk_groups <= e.n_groups,
             f"model.moe.n_groups={e.n_groups} must divide num_experts={E} and "
             f"topk_groups={e.topk_groups} be in [1, n_groups]")
    _require(k <= e.topk_groups * (E // e.n_groups),
             f"model.moe.num_experts_per_tok={k} > topk_groups={e.topk_groups} * "
             f"{E // e.n_groups} experts per group")
    _require(e.routed_scaling_factor > 0 and 0 <= e.jitter_noise < 1,
             f"model.moe.routed_scaling_factor={e.routed_scaling_factor} must be > 0 and "
             f"jitter_noise={e.jitter_noise} in [0, 1)")
    _require(min(e.load_balance_loss_weight, e.router_z_loss_weight,
                 e.routed_bias_update_rate) >= 0,
             f"model.moe.load_balance_loss_weight={e.load_balance_loss_weight}, "
             f"router_z_loss_weight={e.router_z_loss_weight}, "
             f"routed_bias_update_rate={e.routed_bias_update_rate} must be >= 0")
    _require(e.dispatch is None or e.dispatch in DISPATCHES,
             f"model.moe.dispatch={e.dispatch!r}; expected null or one of {DISPATCHES}")
    _require(not (e.dispatch == "capacity" and e.capacity_factor <= 0),
             f"model.moe.dispatch='capacity' needs capacity_factor > 0; got {e.capacity_factor}")
    _require(not (e.dispatch == "dropless" and e.capacity_factor > 0),
             f"model.moe.dispatch='dropless' contradicts capacity_factor={e.capacity_factor} > 0 "
             "(capacity_factor <= 0 means dropless)")
    _require(e.dropless_impl in DROPLESS_IMPLS,
             f"model.moe.dropless_impl={e.dropless_impl!r}; expected one of {DROPLESS_IMPLS}")
    if e.expert_choice:
        _require(e.acknowledge_expert_choice_leaks,
                 "model.moe.expert_choice=true: each expert picks tokens among the whole "
                 "sequence, so an output depends on later tokens -- it leaks the future in this "
                 "causal LM. Set model.moe.acknowledge_expert_choice_leaks=true to run it anyway")
        _require(e.capacity_factor > 0 and not e.expert_parallel
                 and e.routed_bias_update_rate == 0,
                 f"model.moe.expert_choice=true needs capacity_factor > 0 (got "
                 f"{e.capacity_factor}), expert_parallel=false (got {e.expert_parallel}) and "
                 f"routed_bias_update_rate=0 (got {e.routed_bias_update_rate})")


def validate(cfg: Config) -> None:
    from longctx.data import synthetic

    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    validate_model(m)
    _require(d.source in DATA_SOURCES,
             f"data.source={d.source!r}; expected one of {DATA_SOURCES}")
    if d.source != "synthetic":
        _require(d.path is not None, f"data.source={d.source!r} needs data.path")
    _require(d.token_dtype in ("uint16", "uint32"),
             f"data.token_dtype={d.token_dtype!r}; expected 'uint16' or 'uint32'")
    _require(d.task in synthetic.TASKS,
             f"data.task={d.task!r}; expected one of {sorted(synthetic.TASKS)}")
    _require(d.seq_len >= 1, f"data.seq_len={d.seq_len} must be >= 1")
    if m.segment_len and m.attention.backend == "full":
        # `full` carries a KV cache of max_seq_len tokens across segments.
        _require(d.seq_len <= m.max_seq_len,
                 f"data.seq_len={d.seq_len} > model.max_seq_len={m.max_seq_len}: with "
                 f"model.segment_len={m.segment_len} the `full` backend keeps every key of the "
                 "sequence in its KV cache; raise max_seq_len or use segment_len=0")
    try:  # the generator knows its own constraints (vocab, length) and names them
        synthetic.make_batch(d.task, seed=d.seed, start_index=0, batch_size=1,
                             seq_len=d.seq_len, vocab_size=m.vocab_size, **task_kwargs(cfg))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    _require(t.steps >= 1 and t.batch_size >= 1,
             f"train.steps={t.steps}, train.batch_size={t.batch_size} must be >= 1")
    _require(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1")
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


def validate_mesh(m: MeshConfig) -> None:
    from longctx.parallel.sharding import LOGICAL_AXES, MESH_AXES

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
    return {"mqar": dict(num_kv_pairs=d.num_kv_pairs),
            "passkey": dict(passkey_len=d.passkey_len,
                            depth=(d.passkey_depth_min, d.passkey_depth_max))}.get(d.task, {})
