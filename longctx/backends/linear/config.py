"""Config section of the linear attention family, ``model.attention.linear`` (jax-free)."""

from __future__ import annotations

from dataclasses import dataclass

from longctx.errors import require

# variant -> its default feature map (feature_map = null); see longctx.backends.linear.mixer
VARIANTS = {
    "linear": "elu1",
    "retnet": "identity",
    "gla": "identity",
    "deltanet": "silu",
    "gated_deltanet": "silu",
    "kda": "silu",
    "rwkv6": "identity",  # RWKV variants: no feature map, token shift instead of the conv
    "rwkv7": "identity",
}
DELTA_VARIANTS = ("deltanet", "gated_deltanet", "kda")
RWKV_VARIANTS = ("rwkv6", "rwkv7")  # longctx.backends.linear.rwkv_mixer
FEATURE_MAPS = ("identity", "elu1", "relu", "silu", "hedgehog")
# hedgehog (learned, Zhang et al. 2024) doubles the key features to 2K; the variants with a
# decay per key (gla, kda: gates [.., H, K]) would need a gate per feature, so it is refused
HEDGEHOG_VARIANTS = ("linear", "retnet", "deltanet", "gated_deltanet")
# form of a multi-token segment (see longctx.backends.linear.ops.segment_form)
SEGMENT_FORMS = ("auto", "chunk", "chunk_scan", "pallas")
GATE_BIAS_INITS = ("zero", "retnet")


@dataclass(frozen=True)
class LinearConfig:
    variant: str = "gated_deltanet"  # linear|retnet|gla|deltanet|gated_deltanet|kda|rwkv6|rwkv7
    # on q, k: identity | elu1 | relu | silu | hedgehog (learned, softmax([xW, -xW]) per head,
    # W [K, K] from the identity; 2K features); None: the variant's default
    feature_map: str | None = None
    chunk_size: int = 64  # tokens per chunk of the chunkwise-parallel form
    form: str = "auto"  # auto | chunk (parallel) | chunk_scan (sequential) | pallas
    conv_size: int = 4  # short causal depthwise conv on q, k, v (its tail is state); 0: off
    key_dim: int | None = None  # per-head key dim K; None: model head_dim
    value_dim: int | None = None  # per-head value dim V; None: model head_dim
    normalize: bool = False  # divide by q . (decayed sum of k); linear | retnet | gla only
    gate_low_rank: int = 16  # gla, kda: rank of the data-dependent gate projection
    gate_normalizer: float = 16.0  # gla: g = logsigmoid(x W1 W2 + b) / gate_normalizer
    # gla: initial gate bias b. "zero": b = 0 (fla), every key forgets at
    # exp(log(1/2)/16) = 0.958 per step at init; "retnet": per head, the bias that makes
    # g = log(1 - 2^(-5-h)) (RetNet's multi-scale decays) at x = 0.
    gate_bias_init: str = "zero"
    output_norm: bool = True  # RMSNorm over each head's output
    output_gate: bool = True  # o * silu(x W_gate) before the output projection
    # rwkv6 | rwkv7: rank of the LoRAs (token shift, decay, in-context rate, gate); these
    # variants ignore feature_map, conv_size, output_norm, output_gate (they have their own)
    rwkv_low_rank: int = 32

    @property
    def resolved_feature_map(self) -> str:
        return self.feature_map if self.feature_map is not None else VARIANTS[self.variant]

    @property
    def normalize_ok(self) -> bool:
        """``normalize`` needs an additive variant and non-negative features (else z can be ~0)."""
        return (self.variant not in DELTA_VARIANTS
                and self.resolved_feature_map in ("elu1", "relu", "hedgehog"))

    def validate(self, prefix: str = "model.attention.linear") -> None:
        require(self.variant in VARIANTS,
                f"{prefix}.variant={self.variant!r}; expected one of {tuple(VARIANTS)}")
        require(self.feature_map is None or self.feature_map in FEATURE_MAPS,
                f"{prefix}.feature_map={self.feature_map!r}; expected null or one of "
                f"{FEATURE_MAPS}")
        require(self.form in SEGMENT_FORMS,
                f"{prefix}.form={self.form!r}; expected one of {SEGMENT_FORMS}")
        require(self.gate_bias_init in GATE_BIAS_INITS,
                f"{prefix}.gate_bias_init={self.gate_bias_init!r}: expected one of "
                f"{GATE_BIAS_INITS}")
        require(self.chunk_size >= 1 and self.conv_size >= 0 and self.gate_low_rank >= 1,
                f"{prefix}.chunk_size={self.chunk_size}, conv_size={self.conv_size}, "
                f"gate_low_rank={self.gate_low_rank} must be >= 1, >= 0, >= 1")
        require((self.key_dim or 1) >= 1 and (self.value_dim or 1) >= 1
                and self.gate_normalizer > 0,
                f"{prefix}.key_dim={self.key_dim}, value_dim={self.value_dim} must be >= 1 or "
                f"null, gate_normalizer={self.gate_normalizer} > 0")
        require(self.rwkv_low_rank >= 1,
                f"{prefix}.rwkv_low_rank={self.rwkv_low_rank} must be >= 1")
        require(self.variant not in RWKV_VARIANTS or self.feature_map is None,
                f"{prefix}.feature_map={self.feature_map!r}: variant {self.variant!r} "
                f"takes no feature map (expected null)")
        require(self.feature_map != "hedgehog" or self.variant in HEDGEHOG_VARIANTS,
                f"{prefix}.feature_map='hedgehog' needs a variant without a decay per key, "
                f"one of {HEDGEHOG_VARIANTS}; got variant={self.variant!r}")
        require(not self.normalize or self.normalize_ok,
                f"{prefix}.normalize=true needs variant linear | retnet | gla and a "
                f"non-negative feature map (elu1 | relu | hedgehog); got variant={self.variant!r}, "
                f"feature_map={self.feature_map!r}")

    def validate_use(self, model, *, seq_len: int | None, layers: list[int]) -> None:
        """No constraint across sections: any length, with or without segments."""
