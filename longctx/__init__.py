"""longctx: scaling context length and model size in JAX / Flax NNX.

    import longctx
    cfg = longctx.load_config("experiments/configs/tiny.yaml",
                              overrides=["model.attention.pattern=[linear, linear, linear, full]"])
    model = longctx.build_model(cfg.model, rngs=flax.nnx.Rngs(0))
    logits, aux = model(tokens)   # int32 [B, T] -> float32 [B, T, vocab], dict of scalars

    out = longctx.generate(model, prompt, max_new_tokens=64)   # [B, T + 64]
    child = longctx.inherit(model, child_cfg.model, ratio=0.5, rngs=flax.nnx.Rngs(1))

``longctx.ops`` is the functional namespace (every kernel, no Flax). ``longctx.inherit`` is
the function :func:`longctx.inherit.core.inherit` (its package: ``longctx/inherit/``).
"""

from longctx import xla_flags

xla_flags.apply()  # before anything starts a JAX backend (see longctx/xla_flags.py)

from longctx import ops  # noqa: E402
from longctx.config import Config, ConfigError, load_config  # noqa: E402
from longctx.inherit.core import inherit  # noqa: E402
from longctx.model import build_model  # noqa: E402
from longctx.generate import generate  # noqa: E402  (the function; python -m longctx.generate: the CLI)

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "build_model", "generate", "inherit", "load_config", "ops"]
