"""Hugging Face ``config.json`` <-> longctx ``ModelConfig`` (jax-free).

    model_cfg = from_hf_config(json.load(open("config.json")))
    hf_dict = to_hf_config(model_cfg)              # architecture chosen from the features

Families: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``. Both the
transformers 5 ``rope_parameters`` and the older ``rope_theta`` + ``rope_scaling``
are read; ``rope_parameters`` is written. A field that would change the function
and that longctx does not implement (``mlp_bias``, partial rotary, per-layer
sliding windows, ...) is an error that names it; fields without effect on the
forward pass (token ids, dropout, ``use_cache``, ...) are ignored.
"""

from __future__ import annotations

from longctx.config import AttentionConfig, ModelConfig, MoEConfig, validate_model
from longctx.errors import ConfigError
from longctx.rope_config import RopeScalingConfig, ntk_theta

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
               "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")

_ROPE_KEYS = {"factor", "original_max_position_embeddings", "low_freq_factor",
              "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale",
              "mscale_all_dim", "truncate"}


def architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConfigError(f"config.json architectures={archs!r}: expected one of {ARCHITECTURES}")
    return archs[0]


def _unsupported(arch: str, field: str, value, why: str = "") -> ConfigError:
    return ConfigError(f"{arch}: config field {field}={value!r} is not supported by longctx"
                       + (f" ({why})" if why else ""))


def _rope_from_hf(hf: dict, arch: str) -> tuple[float, RopeScalingConfig]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10_000.0
    rtype = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _unsupported(arch, "partial_rotary_factor", partial)
    if rtype == "default":
        return float(theta), RopeScalingConfig()
    if rtype not in ("linear", "dynamic", "yarn", "llama3"):
        raise _unsupported(arch, "rope_parameters.rope_type", rtype,
                           "supported: default, linear, dynamic, yarn, llama3")
    extra = sorted(set(params) - _ROPE_KEYS)
    if extra:
        raise _unsupported(arch, f"rope_parameters.{extra[0]}", params[extra[0]])
    kw = {k: v for k, v in params.items() if v is not None}
    if rtype == "dynamic":  # HF reads the pre-training length from max_position_embeddings
        kw["original_max_position_embeddings"] = hf["max_position_embeddings"]
    elif "original_max_position_embeddings" not in kw:  # HF's standardize_rope_params default
        kw["original_max_position_embeddings"] = hf["max_position_embeddings"]
    if rtype == "yarn" and "factor" not in kw:  # HF: max_position_embeddings / original
        kw["factor"] = hf["max_position_embeddings"] / kw["original_max_position_embeddings"]
    for k in ("beta_fast", "beta_slow"):  # HF: `or 32` / `or 1`
        if k in kw and not kw[k]:
            kw.pop(k)
    return float(theta), RopeScalingConfig(type=rtype, **kw)


def from_hf_config(hf: dict) -> ModelConfig:
    """A validated ``ModelConfig`` reproducing the HF architecture of ``hf`` (config.json)."""
    arch = architecture(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(arch, "hidden_act", hf["hidden_act"], "SwiGLU uses silu")
    if hf.get("mlp_bias"):
        raise _unsupported(arch, "mlp_bias", hf["mlp_bias"])
    if hf.get("pretraining_tp", 1) not in (None, 1):
        raise _unsupported(arch, "pretraining_tp", hf["pretraining_tp"])
    n_heads = hf["num_attention_heads"]
    n_layers = hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    window = hf.get("sliding_window")
    if arch.startswith("Qwen"):  # Qwen: the window only if use_sliding_window (on some layers)
        if hf.get("use_sliding_window"):
            raise _unsupported(arch, "use_sliding_window", True,
                               "per-layer sliding windows (max_window_layers)")
        window = None
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise _unsupported(arch, "layer_types", layer_types)
    bias = bool(hf.get("attention_bias", False))
    attention = AttentionConfig(window=window, qkv_bias=True if arch == "Qwen2ForCausalLM" else bias,
                                out_bias=bias, qk_norm=arch.startswith("Qwen3"))
    moe = MoEConfig()
    if arch in MOE_ARCHITECTURES:
        E = hf.get("num_local_experts") or hf.get("num_experts")
        first_dense = 0
        if arch == "Qwen3MoeForCausalLM":
            only = list(hf.get("mlp_only_layers") or [])
            if only != list(range(len(only))):
                raise _unsupported(arch, "mlp_only_layers", only,
                                   "only a prefix of dense layers (first_dense_layers)")
            first_dense = len(only)
            every = hf.get("decoder_sparse_step", 1)
            if first_dense and every != 1:
                raise _unsupported(arch, "decoder_sparse_step", every,
                                   "with mlp_only_layers only 1")
            norm = bool(hf.get("norm_topk_prob", False))
            expert_dim = hf["moe_intermediate_size"]
        else:  # Mixtral: softmax over all experts, top-k, renormalised
            every, norm, expert_dim = 1, True, None
        moe = MoEConfig(num_experts=E, num_experts_per_tok=hf["num_experts_per_tok"],
                        expert_dim=expert_dim, every=every, first_dense_layers=first_dense,
                        router="softmax_topk", norm_topk_prob=norm,
                        jitter_noise=float(hf.get("router_jitter_noise") or 0.0),
                        load_balance_loss_weight=float(hf.get("router_aux_loss_coef", 0.01)))
    theta, scaling = _rope_from_hf(hf, arch)
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim, mlp_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=theta,
        rope_scaling=scaling, rope_layout="half", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)), attention=attention, moe=moe)
    validate_model(cfg)
    return cfg


def choose_architecture(m: ModelConfig) -> str:
    """The HF family whose features ``m`` has (MoE, q/k norm, biases, window)."""
    a = m.attention
    if m.moe.num_experts:
        return "Qwen3MoeForCausalLM" if a.qk_norm or m.moe.expert_dim else "MixtralForCausalLM"
    if a.qk_norm:
        return "Qwen3ForCausalLM"
    if a.qkv_bias and not a.out_bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if a.window else "LlamaForCausalLM"


def _check_expressible(m: ModelConfig, arch: str) -> None:
    a, e = m.attention, m.moe
    default = AttentionConfig()
    problems = []
    if m.layer_backends != ["full"] * m.n_layers:
        problems.append(f"model.attention.pattern/backend={m.layer_backends} (HF: full only)")
    for key in ("conv_size",):
        if getattr(a, key) != getattr(default, key):
            problems.append(f"model.attention.{key}={getattr(a, key)!r}")
    if m.segment_len:
        problems.append(f"model.segment_len={m.segment_len}")
    qwen2, qwen3 = arch == "Qwen2ForCausalLM", arch.startswith("Qwen3")
    if a.qk_norm != qwen3:
        problems.append(f"model.attention.qk_norm={a.qk_norm} ({arch})")
    if qwen2 and (not a.qkv_bias or a.out_bias):
        problems.append(f"model.attention.qkv_bias={a.qkv_bias}, out_bias={a.out_bias} "
                        "(Qwen2: q/k/v biases, none on o)")
    if not qwen2 and a.qkv_bias != a.out_bias:
        problems.append(f"model.attention.qkv_bias={a.qkv_bias} != out_bias={a.out_bias} "
                        f"({arch}: attention_bias sets both)")
    if a.window and arch.startswith("Qwen"):
        problems.append(f"model.attention.window={a.window} ({arch})")
    if (arch in MOE_ARCHITECTURES) != bool(e.num_experts):
        problems.append(f"model.moe.num_experts={e.num_experts} ({arch})")
    if e.num_experts:
        if e.router != "softmax_topk" or e.shared_experts or e.n_groups != 1 \
                or e.routed_scaling_factor != 1 or e.expert_choice:
            problems.append("model.moe router/shared_experts/n_groups/routed_scaling_factor/"
                            f"expert_choice (HF {arch}: softmax top-k, no shared experts)")
        if arch == "MixtralForCausalLM" and (not e.norm_topk_prob or e.expert_dim
                                             or e.every != 1 or e.first_dense_layers):
            problems.append("model.moe: Mixtral needs norm_topk_prob=true, expert_dim=null, "
                            "every=1, first_dense_layers=0")
        if arch == "Qwen3MoeForCausalLM" and e.first_dense_layers and e.every != 1:
            problems.append("model.moe: first_dense_layers with every != 1")
    if problems:
        raise ConfigError(f"cannot export as {arch}: " + "; ".join(problems))


def _rope_to_hf(m: ModelConfig) -> dict:
    s = m.rope_scaling
    if s.type == "ntk":  # no HF type: the same frequencies are plain RoPE of a larger base
        return {"rope_type": "default",
                "rope_theta": ntk_theta(m.rope_theta, s.factor, m.resolved_head_dim)}
    out = {"rope_type": "default" if s.type == "none" else s.type, "rope_theta": m.rope_theta}
    if s.type == "none":
        return out
    fields = {"linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
                         "high_freq_factor"),
              "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "attention_factor", "mscale", "mscale_all_dim", "truncate")}[s.type]
    out.update({k: getattr(s, k) for k in fields if getattr(s, k) is not None})
    return out


def to_hf_config(m: ModelConfig, architecture: str | None = None) -> dict:
    """The ``config.json`` dict of ``m`` as ``architecture`` (default: :func:`choose_architecture`)."""
    arch = architecture or choose_architecture(m)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"architecture={arch!r}: expected one of {ARCHITECTURES}")
    _check_expressible(m, arch)
    a, e = m.attention, m.moe
    max_pos = m.max_seq_len
    if m.rope_scaling.type == "dynamic":  # HF's dynamic NTK reads L from here
        max_pos = m.rope_scaling.original_max_position_embeddings
    hf = {"architectures": [arch], "model_type": MODEL_TYPES[arch],
          "vocab_size": m.vocab_size, "hidden_size": m.d_model,
          "intermediate_size": m.mlp_dim, "num_hidden_layers": m.n_layers,
          "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
          "head_dim": m.resolved_head_dim, "hidden_act": "silu",
          "max_position_embeddings": max_pos, "rms_norm_eps": m.norm_eps,
          "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings,
          "rope_parameters": _rope_to_hf(m), "dtype": "float32"}
    if arch != "Qwen2ForCausalLM":
        hf["attention_bias"] = a.out_bias
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        hf["sliding_window"] = a.window
    if arch.startswith("Qwen"):
        hf.update(use_sliding_window=False, sliding_window=None)
    if e.num_experts:
        hf.update(num_local_experts=e.num_experts, num_experts_per_tok=e.num_experts_per_tok,
                  router_aux_loss_coef=e.load_balance_loss_weight,
                  output_router_logits=False)
        if arch == "MixtralForCausalLM":
            hf["router_jitter_noise"] = e.jitter_noise
        else:
            hf.update(num_experts=e.num_experts, norm_topk_prob=e.norm_topk_prob,
                      moe_intermediate_size=e.expert_dim or m.mlp_dim,
                      decoder_sparse_step=e.every,
                      mlp_only_layers=list(range(e.first_dense_layers)))
    return hf
