"""The public functional namespace: every kernel of every backend, no Flax.

Layout ``[batch, time, heads, head_dim]``; recurrent states ``[batch, heads,
key_dim, value_dim]`` float32; gates in log space; argument names as in
flash-linear-attention::

    ops.attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None,
                  impl="auto")
    ops.linear_attention(q, k, v, *, g=None, scale=None, initial_state=None,
                         output_final_state=False, normalize=False, chunk_size=64,
                         form="chunk")                        # -> (o, final_state)
    ops.delta_rule(q, k, v, beta, *, g=None, ...)             # -> (o, final_state)
    ops.rwkv6(r, k, v, w, u, *, scale=None, initial_state=None, ...)   # -> (o, final_state)
    ops.rwkv7(r, w, k, v, a, b, *, scale=None, initial_state=None, ...)

Each lives with its backend (``longctx/backends/<name>/ops.py``), its reference
beside its fast forms.
"""

from longctx.backends.full.ops import attention, flash_attention, reference_attention
from longctx.backends.linear.ops import delta_rule, linear_attention
from longctx.backends.linear.rwkv import rwkv6, rwkv7

__all__ = ["attention", "delta_rule", "flash_attention", "linear_attention",
           "reference_attention", "rwkv6", "rwkv7"]
