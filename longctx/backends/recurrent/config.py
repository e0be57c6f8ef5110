"""Config section of segment attention with memories, ``model.attention.recurrent`` (jax-free).

The local attention of a ``recurrent`` layer is exact attention configured by the
keys directly under ``model.attention`` (impl, window, conv_size; see
``longctx.backends.full.config``). This section carries state only when
``model.segment_len > 0`` (``segment_len`` 0: one segment of ``max_seq_len`` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.errors import require

COMPRESSIVE = ("none", "linear", "delta")


@dataclass(frozen=True)
class RecurrentConfig:
    cache_segments: int = 1  # Transformer-XL: previous segments kept as post-RoPE k/v (no grad)
    compressive: str = "none"  # Infini-attention matrix memory update: none | linear | delta
    knn_size: int = 0  # Memorizing Transformer: past (k, v) per kv head in the kNN store; 0: off
    knn_topk: int = 32  # kNN: pairs retrieved per query and head, 1 <= knn_topk <= knn_size
    knn_approx: bool = False  # kNN: jax.lax.approx_max_k (TPU-fast) instead of exact top_k
    knn_recall: float = 0.95  # kNN: recall_target of approx_max_k
    # Recurrent Memory Transformer: memory tokens read at the start of every segment and
    # written at its end, by a wrapper around the whole stack
    # (longctx/backends/recurrent/memory_tokens.py); 0: off. Needs every layer recurrent.
    num_memory_tokens: int = 0

    def validate(self, prefix: str = "model.attention.recurrent") -> None:
        require(self.cache_segments >= 0 and self.knn_size >= 0,
                f"{prefix}.cache_segments={self.cache_segments}, knn_size={self.knn_size} "
                f"must be >= 0")
        require(self.compressive in COMPRESSIVE,
                f"{prefix}.compressive={self.compressive!r}; expected one of {COMPRESSIVE}")
        require(self.num_memory_tokens >= 0,
                f"{prefix}.num_memory_tokens={self.num_memory_tokens} must be >= 0")
        require(not self.knn_size or 1 <= self.knn_topk <= self.knn_size,
                f"{prefix}.knn_topk={self.knn_topk} must be in [1, knn_size={self.knn_size}]")
        require(0 < self.knn_recall <= 1,
                f"{prefix}.knn_recall={self.knn_recall} must be in (0, 1]")

    def validate_use(self, model, *, seq_len: int | None, layers: list[int],
                     prefix: str = "model.attention.recurrent") -> None:
        """Constraints when ``layers`` of ``model`` (a ``ModelConfig``) are ``recurrent``."""
        if not self.num_memory_tokens:
            return
        require(model.segment_len > 0,
                f"{prefix}.num_memory_tokens={self.num_memory_tokens} needs "
                f"model.segment_len > 0 (memory is read and written once per segment)")
        require(len(layers) == model.n_layers,
                f"{prefix}.num_memory_tokens={self.num_memory_tokens}: memory tokens cross "
                f"every layer, so every layer must be `recurrent`; only layers {layers} of "
                f"{model.n_layers} are")
