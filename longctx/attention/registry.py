"""The explicit registry of token mixers: backend name -> ``nnx.Module`` class.

Every class here follows the state protocol of ``longctx.model.mixers``. Add a
backend by importing its class and adding one line; ``grep BACKENDS`` finds all.
"""

from longctx.model.mixers.full import FullAttention
from longctx.model.mixers.linear import LinearAttention
from longctx.model.mixers.recurrent import RecurrentAttention

BACKENDS = {
    "full": FullAttention,  # exact softmax attention (flash / cuDNN / reference)
    "linear": LinearAttention,  # linear attention family: linear, retnet, gla, (gated) deltanet
    "recurrent": RecurrentAttention,  # segments + XL cache, compressive and kNN memory
}
