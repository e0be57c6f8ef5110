"""The Flax NNX language model: layers, token mixers, the Transformer."""

from longctx.model.transformer import Block, Transformer, build_model

__all__ = ["Block", "Transformer", "build_model"]
