"""The Flax NNX language model: the Transformer driver, the mixer registry, the segment engine."""

from longctx.model.transformer import Block, Transformer, build_model

__all__ = ["Block", "Transformer", "build_model"]
