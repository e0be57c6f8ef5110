"""The explicit registry of token mixers: backend name -> ``Mixer`` class.

Every class follows the state protocol of :mod:`longctx.backends.base`. Add a
backend by writing its package under ``longctx/backends/``, importing its mixer
here and adding one line (and its config section to ``longctx.config.SECTIONS``;
a test keeps the two tables equal). ``grep BACKENDS`` finds every backend.
"""

from __future__ import annotations

from flax import nnx

from longctx.backends.base import Mixer, MixerDims
from longctx.backends.full.mixer import FullAttention
from longctx.backends.linear.mixer import LinearAttention
from longctx.backends.recurrent.mixer import RecurrentAttention

BACKENDS: dict[str, type[Mixer]] = {
    "full": FullAttention,  # exact softmax attention (flash / cuDNN / reference)
    "linear": LinearAttention,  # linear attention family: linear, retnet, gla, (gated) deltanet
    "recurrent": RecurrentAttention,  # segments + XL cache, memory tokens, compressive, kNN
}


def build_mixer(name: str, dims: MixerDims, attention, *, rngs: nnx.Rngs) -> Mixer:
    """The ``name`` mixer built from sizes and the ``model.attention`` section."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not registered; registered: {sorted(BACKENDS)}")
    return BACKENDS[name].from_config(dims, attention, rngs=rngs)


def build_stack_wrapper(names, dims: MixerDims, attention, *, rngs: nnx.Rngs):
    """The one module that wraps the whole stack for the backends ``names``, or None."""
    wrappers = [w for n in dict.fromkeys(names)
                if (w := BACKENDS[n].stack_wrapper(dims, attention, rngs=rngs)) is not None]
    if len(wrappers) > 1:
        raise ValueError(f"backends {sorted(set(names))} each want to wrap the stack; "
                         "at most one wrapper is supported")
    return wrappers[0] if wrappers else None
