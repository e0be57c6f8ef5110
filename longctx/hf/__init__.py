"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2/3, Mixtral, Qwen3-MoE.

    model, cfg = longctx.hf.load("path/to/hf_model")     # safetensors, sharded or not
    longctx.hf.save(model, cfg, "out_dir")                # transformers loads it

``config.py``: config.json <-> ``ModelConfig`` (jax-free); ``mapping.py``: the
name / layout table; ``checkpoint.py``: reading, placing and writing tensors.
"""

from longctx.hf.checkpoint import CheckpointError, load, save
from longctx.hf.config import ARCHITECTURES, choose_architecture, from_hf_config, to_hf_config

__all__ = ["ARCHITECTURES", "CheckpointError", "choose_architecture", "from_hf_config", "load",
           "save", "to_hf_config"]
