"""Config section of exact softmax attention (jax-free).

Its keys sit directly under ``model.attention`` (``model.attention.impl``,
``block_q``, ``block_k``, ``window``, ``conv_size``, ``qkv_bias``, ``out_bias``, ``qk_norm``): they configure every layer
that runs exact attention, i.e. the ``full`` layers and the local attention of
the ``recurrent`` layers (which builds on ``full``).
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.errors import require

IMPLS = ("auto", "xla", "flash", "cudnn", "splash")  # see longctx.backends.full.ops
CONTEXT_PARALLEL = ("auto", "ring", "all_gather", "none")  # see longctx.parallel.context


@dataclass(frozen=True)
class FullConfig:
    impl: str = "auto"  # exact-attention kernel: auto | xla | flash | cudnn | splash (TPU)
    block_q: int = 512  # flash, splash (a multiple of 128): query rows per block
    block_k: int = 512  # flash, splash (a multiple of 128): keys per block
    window: int | None = None  # sliding-window size in tokens; None = global attention
    # Short causal depthwise conv on q, k, v before RoPE ("smeared keys", Olsson et al.
    # 2022; canon layers, Allen-Zhu 2025); 0: off.
    conv_size: int = 0
    # With the sequence split over mesh axis `sequence` (> 1): exact attention by ring or
    # all-gather (longctx.parallel.context) and sequence-parallel linear layers (state
    # passing); auto = ring; none = leave attention to GSPMD. No effect on a mesh without it.
    context_parallel: str = "auto"
    # Zigzag token order (device i holds chunks i and 2N-1-i) so causal attention costs every
    # device the same. Used only when every layer is `full` with conv_size 0 (recurrences and
    # convolutions need natural order); otherwise the split is contiguous.
    cp_load_balance: bool = True
    qkv_bias: bool = False  # biases of the q/k/v projections of every full layer (Qwen2; Llama)
    out_bias: bool = False  # bias of the output projection (Llama's attention_bias)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3; model.norm_eps)

    def validate(self, prefix: str = "model.attention") -> None:
        require(self.impl in IMPLS, f"{prefix}.impl={self.impl!r}; expected one of {IMPLS}")
        require(self.block_q >= 1 and self.block_k >= 1,
                f"{prefix}.block_q={self.block_q}, block_k={self.block_k} must be >= 1")
        require(self.impl != "splash" or (self.block_q % 128 == 0 and self.block_k % 128 == 0),
                f"{prefix}.block_q={self.block_q}, block_k={self.block_k} must be multiples of "
                f"128 with {prefix}.impl=splash (the TPU lane width)")
        require(self.conv_size >= 0, f"{prefix}.conv_size={self.conv_size} must be >= 0")
        require(self.context_parallel in CONTEXT_PARALLEL,
                f"{prefix}.context_parallel={self.context_parallel!r}; expected one of "
                f"{CONTEXT_PARALLEL}")
        require(self.window is None or self.window >= 1,
                f"{prefix}.window={self.window} must be >= 1 or null")

    def validate_use(self, model, *, seq_len: int | None, layers: list[int]) -> None:
        """Constraints when ``layers`` of ``model`` (a ``ModelConfig``) are ``full`` layers."""
        if model.segment_len and seq_len is not None:
            # `full` carries a KV cache of max_seq_len tokens across segments.
            require(seq_len <= model.max_seq_len,
                    f"data.seq_len={seq_len} > model.max_seq_len={model.max_seq_len}: with "
                    f"model.segment_len={model.segment_len} the `full` layers {layers} keep "
                    "every key of the sequence in their KV cache; raise max_seq_len or use "
                    "segment_len=0")
